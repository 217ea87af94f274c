"""`python -m gateway`: devices over HTTP (the OwnTracks app's HTTP mode, NDJSON streams for
devices without MQTT) into the same path as the bridges: validation, batches, the backend."""
