"""Cluster mode on NATS JetStream (issue 16).

The foundation is a small trio-native NATS client:

* :mod:`mqttd.cluster.nats_protocol` - sans-IO: the parser and encoders of the NATS client
  protocol (no trio, no sockets);
* :mod:`mqttd.cluster.nats_client` - trio: one connection to one of a list of servers,
  subscriptions, request/reply, keepalive, reconnect (:mod:`~mqttd.cluster.nats_values`:
  its errors, options and handles);
* :mod:`mqttd.cluster.jetstream` - the JetStream subset the cluster design uses (streams,
  publish with PubAck, direct get, purge);
* :mod:`mqttd.cluster.consumer` - an ordered push consumer for watching a subject filter;
* :mod:`mqttd.cluster.kv` - the key-value layer on a ``KV_<bucket>`` stream.

It imports nothing of the broker (import-linter checks it); docs/cluster-nats-client.md
describes what it supports and the nats-server version facts it relies on.
"""
