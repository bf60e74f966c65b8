"""Remoe [IV]: deployment and per-request planning (SPS, MMP, remote memory by Lagrangian dual, LPT
replicas) and the serverless cost model its plans and baselines are costed with. Entry point:
planner.plan_remoe. See docs/remoe.md."""
