"""A style from one reference image: the three-stage style encoder (arXiv 2510.01347).

- `splice`: the style vectors in place of the placeholder token's input embedding, through
  the frozen CLIP text transformer.
- `encoder`: the CLIP ViT image tower and the projection to the style tokens; loading a
  pretrained tower; the PyTorch export.
- `data`: the batches of the three stages (images, spliced prompts, example indices).
- `stages`: each stage's state and pure step.
- `run`: a stage's training run (mesh, restore, `loop.run` with hooks, checkpoints).

docs/style_encoder.md describes the method and where it differs from the public code.
"""
