"""Agent Orchestrator: the realtime gateway between chat frontends and an Agent Execution Service."""
