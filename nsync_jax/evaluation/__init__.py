"""Style and quality metrics (CSD, CMMD, KID, FID) and their JAX embedders.

metrics.py      set-level math on embeddings (NumPy float64)
clip_embed.py   CLIP ViT embedders: CSD (OpenAI-layout checkpoint) and CMMD (HF folder)
inception.py    Flax Inception v3 to pool3, pytorch-fid and torchvision variants
images.py       listing, loading and each embedder's crop/resize
weights.py      weight files (safetensors, npz, msgpack, torch) and checked assignment
compare.py      the metrics chosen by `config.eval` between a real and a generated set
"""
