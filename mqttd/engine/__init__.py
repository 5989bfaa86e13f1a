"""The broker without I/O (no trio): packet handling over one state, timers as data.
:class:`mqttd.service.Broker` runs it on the network."""
