"""The gateway: connections, sessions, the hub, the node, the pub/sub broker, rooms."""
