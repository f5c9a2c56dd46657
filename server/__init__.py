"""tessera.server: the central CA and registration service (tessera-server)."""
