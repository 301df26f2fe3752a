"""MQTT bridge: sensor topics in, results out, status with last will."""
