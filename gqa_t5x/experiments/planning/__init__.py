"""`gqa-t5x plan`: which kv heads to convert a multi-head checkpoint to, for a device and a decoding shape.

Modules: `candidates` (the configurations listed: uniform, self != cross,
per layer under a KV-byte budget), `planner` (roofline prediction of time
per sample and KV bytes, alpha-0 loss of each conversion, Pareto fronts),
`report` (console table, plan.md / plan.json / plan.png). See
docs/experiments.md, "Planning kv heads".
"""
