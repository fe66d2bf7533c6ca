"""Every field a run reads, with its default and one comment each.

Other configs import this and override; library code never invents a default. Run:
    python launch/train.py --config configs/default.py --workdir /tmp/nsync
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Model init, shuffling, flips, noise: one seed for the whole run.

    config.model = ml_collections.ConfigDict()
    config.model.source = "pretrained"  # "pretrained" (a diffusers folder or hub id) or "tiny".
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Folder or hub id.
    config.model.revision = ""  # Hub revision; "" for the default branch.
    config.model.init_from = ""  # Workdir of a trained run whose newest params are the base.
    config.model.variant = ""  # Weight file variant ("fp16" reads *.fp16.safetensors); "" none.
    config.model.resolution = 512  # Training image side in pixels.
    config.model.param_dtype = "float32"  # Dtype the parameters are held in.
    config.model.compute_dtype = "float32"  # Dtype of activations ("bfloat16" on TPU/GPU).
    config.model.tiny = ml_collections.ConfigDict()  # Random-init tiny model (source="tiny").
    config.model.tiny.unet_channels = (32, 64)  # UNet block widths; multiples of 32.
    config.model.tiny.layers_per_block = 1  # ResNet layers per UNet block.
    config.model.tiny.attention_head_dim = 8  # Attention head width in the UNet.
    config.model.tiny.vae_channels = (32, 32)  # VAE block widths; len-1 halvings of the side.
    config.model.tiny.identity_vae = False  # Latents = pixels + a zero channel (needs 1 block).
    config.model.tiny.text_hidden = 32  # CLIP text width (= UNet cross-attention width).
    config.model.tiny.text_layers = 2  # CLIP text layers.
    config.model.tiny.text_heads = 4  # CLIP text attention heads.
    config.model.tiny.max_length = 77  # Token sequence length, as SD's.
    config.model.tiny.num_train_timesteps = 1000  # DDPM steps of the noise schedule.
    config.model.tiny.prediction_type = "epsilon"  # "epsilon" (SD 1.x) or "v_prediction".

    config.data = ml_collections.ConfigDict()
    config.data.source = "demo"  # Where positives come from: "demo" (made in-process).
    config.data.demo_count = 40  # Number of demo style images.
    config.data.demo_seed = 0  # Seed of the demo images' layouts.
    config.data.random_flip = True  # Random horizontal flips, per branch.
    config.data.digits_classes = tuple(range(10))  # "digits" source: classes kept.
    config.data.digits_count = 0  # "digits" source: images kept (0: all of those classes).
    config.data.digits_rendering = "plain"  # "digits" source: "plain" or "styled" images.

    config.negatives = ml_collections.ConfigDict()
    config.negatives.source = "demo"  # Where negatives come from: "demo" or "store" (a folder).
    config.negatives.path = ""  # Store folder (launch/generate_negatives.py writes it).
    config.negatives.prompt_template = "{caption} in the style of painting"  # Initializer word.
    config.negatives.per_example = 1  # K images generated per training caption.
    config.negatives.pair_k = 0  # Which of the K images the trainer pairs with each positive.
    config.negatives.scheduler = "pndm"  # "pndm" (SD 1.5's), "ddim", "euler" or "dpm_solver".
    config.negatives.num_steps = 50  # Denoising steps.
    config.negatives.guidance_scale = 7.5  # Classifier-free guidance weight (1 disables).
    config.negatives.negative_prompt = ""  # Unconditional prompt of guidance.
    config.negatives.size = 256  # Side of the saved PNGs in px; 0 keeps the model resolution.
    config.negatives.seed = 0  # Base seed; each image's noise folds in a hash of (id, k).
    config.negatives.batch_per_device = 4  # Images each device denoises at once.

    config.sample = ml_collections.ConfigDict()
    config.sample.prompt_template = "{caption} in the style of {style}"  # For --split captions.
    config.sample.scheduler = "pndm"  # "pndm" (SD 1.5's), "ddim", "euler" or "dpm_solver".
    config.sample.num_steps = 50  # Denoising steps.
    config.sample.guidance_scale = 7.5  # Classifier-free guidance weight (1 disables).
    config.sample.negative_prompt = ""  # Unconditional prompt of guidance.
    config.sample.size = 0  # Side of the saved PNGs in px; 0 keeps the model resolution.
    config.sample.seed = 0  # Base seed; image j of prompt i folds in i * num_per_prompt + j.
    config.sample.batch_per_device = 4  # Images each device denoises at once.

    config.train = ml_collections.ConfigDict()
    config.train.mode = "nsync"  # "nsync" (projected g+) or "finetune" (the baseline).
    config.train.scope = "textual_inversion"  # What trains: "unet" or "textual_inversion".
    config.train.num_steps = 8000  # Optimizer updates.
    config.train.batch_size = 2  # Global batch per branch (positives; negatives alike).
    config.train.share_noise = False  # Both branches share noise and timesteps if True.
    config.train.style_token = "<s*>"  # The style's word; a new token for textual inversion.
    config.train.initializer_token = "painting"  # Word the new token's embedding starts from.
    config.train.prompt_template = "{caption} in the style of {style}"  # Both branches' prompt.

    config.nsync = ml_collections.ConfigDict()
    config.nsync.rule = "paper"  # "paper", "v41", "v42" (reference code) or "conflicting".
    config.nsync.granularity = "global"  # One coefficient for the tree, or "per_tensor".
    config.nsync.eps = 1e-12  # Added to ‖g−‖² in the projection's denominator.
    config.nsync.negative_every = 1  # Fresh g− every k steps, reused in between (1: always).

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3  # AdamW peak learning rate (reference: 1e-3).
    config.optim.schedule = "constant"  # Learning-rate schedule (reference: constant).
    config.optim.warmup_steps = 0  # Linear warm-up steps before the schedule.
    config.optim.b1 = 0.9  # Adam β1.
    config.optim.b2 = 0.999  # Adam β2.
    config.optim.eps = 1e-8  # Adam ε.
    config.optim.weight_decay = 1e-2  # Decoupled weight decay (reference: 1e-2).
    config.optim.clip_norm = 0.0  # Global-norm clipping after the projection; 0 disables.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Data-parallel axis size; -1 takes the devices left.
    config.mesh.fsdp = 1  # FSDP axis size (parameters and optimizer state sharded).

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000  # Steps between async saves; 0 saves only at the end/SIGTERM.
    config.checkpoint.keep = 3  # Newest checkpoints kept in <workdir>/checkpoints.
    config.checkpoint.restore_step = -1  # Resume from this saved step; -1 for the newest.

    config.log = ml_collections.ConfigDict()
    config.log.every = 50  # Steps between metric writes (and the non-finite check).
    return config
