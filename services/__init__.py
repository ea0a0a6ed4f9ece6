"""Agent Orchestrator: realtime gateway between chat frontends and an Agent Execution Service."""
