"""Bridges: this broker connects to remote MQTT brokers as a client and carries messages
across, store and forward (:mod:`mqttd.bridge.link`), per topic mapping
(:mod:`mqttd.bridge.mapping`); :class:`Bridges` runs every configured one."""

from mqttd.bridge.bridges import Bridges
from mqttd.bridge.link import STABLE_LINK_S, BridgeLink, LinkDown
from mqttd.bridge.mapping import TopicMapping

__all__ = ["STABLE_LINK_S", "BridgeLink", "Bridges", "LinkDown", "TopicMapping"]
