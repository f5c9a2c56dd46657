"""tessera.agent: the per-host daemon serving the SPIFFE Workload API (tessera-agent)."""
