"""Every field a run reads, with its default and one comment each.

Other configs import this and override; library code never invents a default. Run:
    python launch/train.py --config configs/default.py --workdir /tmp/nsync
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Model init, shuffling, flips, noise: one seed for the whole run.

    config.model = ml_collections.ConfigDict()
    config.model.source = "pretrained"  # "pretrained" (folder or hub id), "tiny" or "random".
    config.model.architecture = "sd15"  # source="random": "sd15", "sd2_base" or "tiny" weights.
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Folder or hub id.
    config.model.revision = ""  # Hub revision; "" for the default branch.
    config.model.init_from = ""  # Trained run's workdir; newest params (EMA if kept) are the base.
    config.model.variant = ""  # Weight file variant ("fp16" reads *.fp16.safetensors); "" none.
    config.model.resolution = 512  # Training image side in pixels.
    config.model.param_dtype = "float32"  # Dtype the parameters are held in.
    config.model.compute_dtype = "float32"  # Dtype of activations ("bfloat16" on TPU/GPU).
    config.model.frozen_dtype = ""  # Frozen parts' dtype; "" = param_dtype, "bfloat16" halves them.
    config.model.attention = "xla"  # UNet attention: "xla", "dot_product", "chunked", "splash".
    config.model.remat = "none"  # Recompute in backward: "none", "blocks" (per UNet block), "full".
    config.model.remat_policy = ""  # jax.checkpoint_policies name of what remat keeps; "" nothing.
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
    config.data.source = "demo"  # Where positives come from: "demo", "tfds" or "folder".
    config.data.demo_count = 40  # Number of demo style images.
    config.data.demo_seed = 0  # Seed of the demo images' layouts.
    config.data.random_flip = True  # Random horizontal flips, per branch.
    # Aspect-ratio buckets (docs/data.md): () off (square), "auto", or ((height, width), ...);
    # typed `object`, so "auto" may replace the default ().
    config.data.buckets = ml_collections.FieldReference((), field_type=object)
    config.data.val_count = 0  # Style images held out for the validation loss (log.val_every).
    config.data.caption_dropout = 0.0  # Chance a row's prompt is "" (per branch; for CFG); 0 = off.
    config.data.tfds_name = "cycle_gan/monet2photo"  # TFDS dataset (source="tfds").
    config.data.split = "trainA"  # TFDS split; CycleGAN's style side is trainA / testA.
    config.data.tfds_data_dir = ""  # Prepared TFDS data dir; "" means TFDS_DATA_DIR or the default.
    config.data.tfds_download = False  # Let tfds download and prepare (array_record) if missing.
    config.data.path = ""  # Image folder with metadata.jsonl (source="folder").
    config.data.captions_file = ""  # JSON/JSONL {example id: caption}; overrides the source's.
    config.data.caption_template = "a painting"  # Caption where none exist (logged when used).
    config.data.caption_fallback = False  # Template for ids the captions file lacks, not an error.
    config.data.on_bad_image = "error"  # Unreadable image: "error" names it, "skip" counts it.
    config.data.cache_images = True  # Keep decoded, resized images in host memory once read.
    config.data.cache_latents = False  # Encode images (both flips) once with the frozen VAE.
    config.data.latent_batch_size = 16  # Images per VAE call when building the latent cache.
    config.data.digits_classes = tuple(range(10))  # "digits" source: classes kept.
    config.data.digits_count = 0  # "digits" source: images kept (0: all of those classes).
    config.data.digits_rendering = "plain"  # "digits" source: a digits.RENDERINGS or MIXES name.
    config.data.styles = ()  # Several styles: ({"token", "label", data fields}, ...); () = one.

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
    config.sample.every = 0  # Training draws sample.prompts every N steps (0: never).
    config.sample.prompts = ()  # What training draws; () a few training prompts + one unseen.

    config.train = ml_collections.ConfigDict()
    config.train.mode = "nsync"  # "nsync" (projected g+) or "finetune" (the baseline).
    config.train.scope = "textual_inversion"  # unet, unet_text_encoder, textual_inversion, lora*
    config.train.num_steps = 8000  # Optimizer updates.
    config.train.batch_size = 2  # Global batch per branch (positives; negatives alike).
    config.train.grad_accum = 1  # Micro-batches per step (each branch accumulated, then projected).
    config.train.share_noise = False  # Both branches share noise and timesteps if True.
    config.train.style_token = "<s*>"  # The style's word; a new token for textual inversion.
    config.train.initializer_token = "painting"  # Word the new token's embedding starts from.
    config.train.prompt_template = "{caption} in the style of {style}"  # Both branches' prompt.
    config.train.ema_decay = 0.0  # EMA decay of the trained weights (e.g. 0.9999); 0 = off.
    config.train.min_snr_gamma = 0.0  # Min-SNR-γ loss weight per example (5 is usual); 0 = off.
    config.train.noise_offset = 0.0  # Noise += this·N(0,1) per example and channel; 0 = off.
    config.train.timestep_min = 0  # Training timesteps are uniform in [timestep_min, timestep_max).
    config.train.timestep_max = -1  # Exclusive upper end; -1 = the noise schedule's T (1000).
    config.train.supcon_weight = 0.0  # SupCon over style labels (needs data.styles); 0 = off.
    config.train.supcon_projected = False  # SupCon's gradient before NSYNC's projection if True.
    config.train.supcon_temperature = 0.07  # SupCon τ.
    config.train.supcon_base_temperature = 0.07  # SupCon τ_base; the loss is scaled by τ/τ_base.
    config.train.supcon_encoder = ""  # Frozen image encoder: HF CLIP folder, or "tiny" (tests).
    config.train.supcon_views = "noise"  # Second branch: "noise" (another draw) or "captions".
    config.train.supcon_view_template = "{style} style, {caption}"  # "captions" view's prompt.

    config.lora = ml_collections.ConfigDict()  # Read by train.scope "lora" and "lora_ti".
    config.lora.rank = 8  # r of every adapter.
    config.lora.alpha = 8.0  # Adapter output scaled by alpha / rank (PEFT's lora_alpha).
    config.lora.unet_targets = "attention"  # Names/groups: attention, proj, ff, resnet (LoCon).
    config.lora.text_targets = ""  # Text-encoder targets, e.g. "text_attention"; "" none.
    config.lora.init = "gaussian"  # A's init: "gaussian" (N(0, 1/r)) or "kaiming"; B is zero.
    config.lora.implementation = "merge"  # "merge" (W + s·AB in the loss) or "intercept".
    config.lora.base_dtype = "float32"  # Dtype the frozen base is held in ("bfloat16" halves it).
    config.lora.seed = 0  # Seed of the adapters' random A.
    config.lora.export_layout = "peft"  # LoRA file layout: "peft" (diffusers) or "kohya".
    config.lora.fold_alpha = False  # Export: fold alpha/rank into B instead of header metadata.
    config.lora.export_merged = False  # Export: also a full pipeline with the LoRA merged in.

    config.nsync = ml_collections.ConfigDict()
    config.nsync.rule = "paper"  # "paper", "v41", "v42" (reference code) or "conflicting".
    config.nsync.granularity = "global"  # One coefficient for the tree, or "per_tensor".
    config.nsync.eps = 1e-12  # Added to ‖g−‖² in the projection's denominator.
    config.nsync.negative_every = 1  # Fresh g− every k steps, reused in between (1: always).

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"  # "adamw" (reference), "adafactor", "lion" or "sgd" (optax's).
    config.optim.learning_rate = 1e-3  # Peak learning rate (reference: 1e-3).
    config.optim.schedule = "constant"  # The reference; or "linear", "cosine", "warmup_cosine".
    config.optim.warmup_steps = 0  # Linear warm-up steps from 0 before the schedule.
    config.optim.final_lr_fraction = 0.0  # linear/cosine: LR at train.num_steps, as peak fraction.
    config.optim.b1 = 0.9  # Adam/Lion β1; SGD momentum (0: none); unused by adafactor.
    config.optim.b2 = 0.999  # Adam/Lion β2 (Lion's own default is 0.99).
    config.optim.eps = 1e-8  # Adam ε.
    config.optim.weight_decay = 1e-2  # Weight decay, decoupled (SGD: L2); reference 1e-2.
    config.optim.clip_norm = 0.0  # Global-norm clipping after the projection; 0 disables.

    config.eval = ml_collections.ConfigDict()
    config.eval.metrics = ("csd", "cmmd", "kid", "fid")  # Which metrics compare() computes.
    config.eval.real_dir = ""  # Folder of real style images (the test split), for compare.
    config.eval.generated_dir = ""  # Folder of generated images, for compare.
    config.eval.batch_size = 32  # Images per embedder call; rounded up to the device count.
    config.eval.csd_weights = ""  # CSD checkpoint (.pth with model_state_dict, or .safetensors).
    config.eval.cmmd_weights = ""  # HF folder of openai/clip-vit-large-patch14-336.
    config.eval.inception_weights = ""  # Inception v3 state dict (.pth, .safetensors or .npz).
    config.eval.inception_variant = "pytorch_fid"  # "pytorch_fid" (FID standard) or "torchvision".
    config.eval.kid_subsets = 100  # KID random subsets.
    config.eval.kid_max_subset_size = 1000  # KID subset size is min(n_real, n_gen, this).
    config.eval.fid_bootstrap = 0  # FID bootstrap resamples (paper: 10); 0 reports plain FID only.
    config.eval.seed = 0  # Seed of KID subsets and FID bootstrap draws.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Data-parallel axis size; -1 takes the devices left.
    config.mesh.fsdp = 1  # FSDP axis size (parameters and optimizer state sharded).

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000  # Steps between saves; 0: only at the end, SIGTERM or Ctrl-C.
    config.checkpoint.keep = 3  # Newest checkpoints kept in <workdir>/checkpoints.
    config.checkpoint.restore_step = -1  # Resume from this saved step; -1 for the newest.

    config.log = ml_collections.ConfigDict()
    config.log.every = 50  # Steps between metric writes (and the non-finite check).
    config.log.val_every = 0  # Steps between validation losses (a multiple of log.every; 0 off).
    return config
