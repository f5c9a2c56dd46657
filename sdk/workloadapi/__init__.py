"""Workload API client for workloads, and the wire mapping shared with the agent."""
