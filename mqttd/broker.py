"""Where ``Broker`` and ``running`` have always been imported from: the service
(:mod:`mqttd.service`, the trio side) over the engine (:mod:`mqttd.engine`, the sans-IO
side)."""

from mqttd.service import Broker, running

__all__ = ["Broker", "running"]
