"""What every way in for devices shares (the bridge from MQTT, the device gateway from HTTP):
batching into the backend with acknowledgement once it holds an event, the per-device rate
limit, and the OwnTracks app's format."""
