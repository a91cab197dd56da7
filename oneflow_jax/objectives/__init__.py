"""Training objectives: insertion Edit Flow noising and text loss (`edit_flow`, paper Eq. 7), latent Flow Matching
(`flow_matching`), OneFlow's joint loss on a packed batch (`oneflow_objective`) and the AR+FM baseline's
(`ar_objective`)."""
