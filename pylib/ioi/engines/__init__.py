"""How a model is run under intervention.

The readable references, one hooked forward pass per patched component (TransformerLens hooks):
- `hooks`: activation patching (residual stream, layer outputs, head outputs, head q/k/v/pattern)
- `hooks_paths`: path patching (Wang et al. 2022, App. B)

The fast twins, tested against the references to 1e-4 and used by the study:
- `fast`: the model as plain tensors and exact activation patching that carries only what a patch
  can change
- `fast_paths`: exact path patching from one clean and one corrupted cached run
- `fast_ablation`: exact mean-ablation for the circuit criteria
- `attribution`: attribution patching, the first-order estimate of every patch at once

Which one a study uses:
- `check`: whether the fast engines are exact on the model in hand (unimplemented features named
  up front; fast logit differences against the bridge's on the study's prompts)
- `auto`: the study's engine, fast where `check` verifies it, the hook references elsewhere
- `state`: what the engines keep per model (its FastModel, verdicts), freed with the model
"""
