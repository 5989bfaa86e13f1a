"""Cluster mode (preview, issue 16): the broker-facing side of several mqttd nodes on NATS
JetStream, over the NATS client in :mod:`mqttd.cluster` (which knows nothing of the broker).

* :mod:`~mqttd.clustering.subjects` - MQTT topics and filters as NATS subjects (sans-IO);
* :mod:`~mqttd.clustering.wire` - what a message carries between nodes: headers for origin,
  order, QoS, retain and 5.0 properties (sans-IO);
* :mod:`~mqttd.clustering.node` - the service: live routing over core NATS (interest per
  distinct local filter, every accepted PUBLISH exported, imports routed locally), the
  retained stream, liveness, counters.

README.md "Cluster mode (preview)" says what this slice does and does not promise yet.
"""
