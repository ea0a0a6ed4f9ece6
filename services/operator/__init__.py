"""The TierQuota operator: kopf handlers, thin over the quota store of `services.core.quotas`.

`spec` checks a resource's spec, `claims` decides which resource owns a tenant, `reconcile`
holds every decision (tested against real Redis without Kubernetes), `status` shapes what the
resource reports, `handlers` wires it into kopf, `rbac` lists the permissions that needs,
`settings` and `main` configure and start it (`orchestrator operator`).
"""
