"""`python -m wsgate`: MQTT over WebSockets for managers, in front of a broker's plain MQTT port.

Debian's Mosquitto 2.0.11 WebSockets listener (libwebsockets) binds every interface whatever
address it is given, ignores `max_packet_size` and buffers whatever length a packet announces
before authentication (one anonymous connection announcing a 200 MB CONNECT held 100 MB of the
broker). The brokers therefore have no WebSockets listener any more; this gateway speaks
WebSockets (subprotocol `mqtt`, binary frames, paths `/mqtt` and `/`) and pipes each client's
MQTT byte stream to the broker's plain MQTT listener over one TCP connection per client.
Authentication and the ACL stay the broker's; the gateway bounds what a client can make it
hold before the broker ever sees a byte (`wsgate.service`, `wsgate.mqtt_guard`).
"""
