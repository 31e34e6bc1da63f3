"""The engine: one normalization step for every layer at once, and what it is made of.

The rule contract (`rule`), what a layer is (`layers`), the plan of a gradient
layout (`plan`), the step (`engine`, `measure`, `rounds`), grouped kernels
(`kernels`, `triton_scale`), the rules' state (`state`), the report, the
non-finite policies and sharded gradients (`sharding`, `collective`). Nothing
here imports the rules, the normalizer, the integrations or the commands.
"""
