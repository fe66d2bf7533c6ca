"""Text-to-image sampling with classifier-free guidance, spread over the devices of a mesh.

The denoising loop is one jitted function: text encoding, the scheduler's loop as a
`jax.lax.fori_loop`, and VAE decoding. Schedulers are our samplers (`models.samplers`,
stepping as diffusers' PNDM, DDIM, Euler and DPM-Solver schedulers do), picked by name
(`SCHEDULERS`) and configured from the model's own scheduler config, so a pretrained model
samples with the noise schedule it was trained with.

Determinism: image i's initial noise is `normal(fold_in(key(seed), image_seeds[i]))`, and
every later operation acts on each image alone (GroupNorm, attention and the schedulers
are per-sample), so an image's pixels depend on its prompt and seeds only, not on which
batch, batch position or device produced it (up to float rounding of batched kernels).

The batch is sharded over every device of the mesh; parameters use the project's FSDP
shardings (replicated when `mesh.fsdp == 1`). In multi-host runs each process passes its
own prompts and gets its own images back; all processes must run the same number of
batches (`pad_to`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from nsync_jax import hosts, models, sharding
from nsync_jax.models import samplers

Params = dict[str, Any]

# "pndm" is SD 1.5's default (with its PRK warm-up unless the config sets skip_prk_steps).
SCHEDULERS = tuple(samplers.SAMPLERS)


def make_scheduler(name: str, scheduler_config: dict[str, Any], num_steps: int) -> samplers.Sampler:
    """The sampler `name` for `num_steps` steps with the model's noise-schedule config."""
    return samplers.make_sampler(name, scheduler_config, num_steps)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What decides the pixels, besides the model, prompt and seeds.

    Attributes:
      scheduler: a key of `SCHEDULERS`.
      num_steps: inference steps (the scheduler may run a few more model calls, e.g.
        PNDM's Runge-Kutta warm-up).
      guidance_scale: classifier-free guidance weight; 1 turns guidance off.
      negative_prompt: the unconditional prompt of guidance ("" as SD samples).
    """

    scheduler: str
    num_steps: int
    guidance_scale: float
    negative_prompt: str

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.scheduler == "pndm" and self.num_steps < 4:
            # PNDM's PRK warm-up runs on the last 4 inference steps (unless the model's
            # config skips it, which these settings cannot know).
            raise ValueError(f"the pndm scheduler needs num_steps >= 4, got {self.num_steps}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    @classmethod
    def from_config(cls, group: ml_collections.ConfigDict) -> SamplerSettings:
        """From a config group with the sampler fields (`sample` or `negatives`)."""
        return cls(
            scheduler=group.scheduler,
            num_steps=group.num_steps,
            guidance_scale=float(group.guidance_scale),
            negative_prompt=group.negative_prompt,
        )


def initial_noise(seed: jax.Array, image_seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise of `shape` per image, from `fold_in(key(seed), image_seed)`."""
    base = jax.random.key(seed)

    def one(image_seed):
        return jax.random.normal(jax.random.fold_in(base, image_seed), shape, jnp.float32)

    return jax.vmap(one)(image_seeds)


def classifier_free(scale: float) -> Callable[[jax.Array], jax.Array]:
    """Combines predictions [B, 2, ...] of (unconditional, conditional) contexts as
    ε = ε(∅) + scale · (ε(c) − ε(∅))."""
    scale = jnp.float32(scale)

    def combine(predictions):
        uncond, cond = predictions[:, 0], predictions[:, 1]
        return uncond + scale * (cond - uncond)

    return combine


def make_denoise_fn(
    model: models.StableDiffusion, settings: SamplerSettings
) -> Callable[..., jax.Array]:
    """`denoise(params, contexts, combine, image_seeds, seed) -> images`, to be jitted.

    `contexts` [B, K, L, D] holds K text contexts per image; each UNet call runs the B·K
    rows (image i's rows next to each other, so under a batch sharding every device keeps
    its own images' rows) and `combine` maps the predictions [B, K, ...] to the one
    [B, ...] the scheduler steps with (`classifier_free` for K = 2). Other arguments and
    the result as `make_generate_fn`'s.
    """
    scheduler = make_scheduler(settings.scheduler, model.scheduler_config, settings.num_steps)

    def denoise(params, contexts, combine, image_seeds, seed):
        batch, k = contexts.shape[:2]
        context = contexts.reshape((batch * k,) + contexts.shape[2:])
        noise = initial_noise(seed, image_seeds, model.latent_shape)
        latents = noise * scheduler.init_noise_sigma
        state = scheduler.init_state(latents)

        def body(i, carry):
            latents, state = carry
            t = jnp.asarray(scheduler.timesteps)[i]
            model_input = scheduler.scale_model_input(state, latents, i)
            if k > 1:
                model_input = jnp.repeat(model_input, k, axis=0)
            # Float timesteps: Euler's are fractional; integer ones embed identically.
            timesteps = jnp.full((model_input.shape[0],), t, jnp.float32)
            prediction = model.predict_noise(
                params["unet"], model_input.astype(model.unet.dtype), timesteps, context
            ).astype(jnp.float32)
            prediction = combine(prediction.reshape((batch, k) + prediction.shape[1:]))
            return scheduler.step(state, prediction, i, latents)

        # The loop length is the sampler's, not num_steps: PNDM makes extra calls.
        latents, _ = jax.lax.fori_loop(0, scheduler.num_calls, body, (latents, state))
        pixels = model.decode_latents(params["vae"], latents.astype(model.vae.dtype))
        images = jnp.transpose(pixels.astype(jnp.float32), (0, 2, 3, 1)) / 2 + 0.5
        return jnp.clip(images, 0.0, 1.0)

    return denoise


def make_generate_fn(
    model: models.StableDiffusion, settings: SamplerSettings
) -> Callable[[Params, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """`generate(params, input_ids, uncond_ids, image_seeds, seed) -> images`, to be jitted.

    Args of the returned function:
      params: `{"unet", "vae", "text_encoder"}`.
      input_ids: [B, L] prompt token ids.
      uncond_ids: [1, L] token ids of the negative prompt.
      image_seeds: [B] uint32, one per image.
      seed: uint32 scalar, the base seed.
    Returns float32 [B, H, W, 3] images in [0, 1].
    """
    denoise = make_denoise_fn(model, settings)
    guided = settings.guidance_scale != 1.0

    def generate(params, input_ids, uncond_ids, image_seeds, seed):
        context = model.encode_text(params["text_encoder"], input_ids)
        if not guided:
            return denoise(params, context[:, None], lambda p: p[:, 0], image_seeds, seed)
        uncond = model.encode_text(params["text_encoder"], uncond_ids)
        uncond = jnp.broadcast_to(uncond, context.shape).astype(context.dtype)
        contexts = jnp.stack([uncond, context], axis=1)
        return denoise(
            params, contexts, classifier_free(settings.guidance_scale), image_seeds, seed
        )

    return generate


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounding."""
    return np.round(np.asarray(images, np.float32) * 255.0).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 HWC `image` to `size` px (bicubic, antialiased); 0 keeps it."""
    if size == 0 or image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, shard.data)  # Replicas hold the same rows.
    return np.concatenate([np.asarray(shards[s]) for s in sorted(shards)])


class Sampler:
    """Generates images for prompts with fixed parameters, settings and base seed.

    Args:
      model: the Stable Diffusion parts.
      params: `{"unet", "vae", "text_encoder"}` (placed on the mesh here).
      mesh: the device mesh; the batch is split over all its devices.
      settings: scheduler, steps, guidance and negative prompt.
      seed: base seed; image i's noise comes from `fold_in(key(seed), image_seed_i)`.
      batch_per_device: images each device denoises at once.
    """

    def __init__(
        self,
        model: models.StableDiffusion,
        params: Params,
        mesh: jax.sharding.Mesh,
        settings: SamplerSettings,
        seed: int,
        batch_per_device: int,
    ):
        if batch_per_device < 1:
            raise ValueError(f"batch_per_device must be >= 1, got {batch_per_device}")
        self.model = model
        self.mesh = mesh
        self.settings = settings
        self.seed = seed
        local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self.local_batch = batch_per_device * len(local_devices)
        self.global_batch = batch_per_device * mesh.devices.size
        params = {k: params[k] for k in ("unet", "vae", "text_encoder")}
        param_shardings = sharding.tree_shardings(mesh, params)
        self._param_shardings = param_shardings
        self.params = sharding.place(params, param_shardings)
        batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        # Host copies fill the padding rows; device copies go to every call.
        self._uncond_tokens = np.asarray(model.tokenize([settings.negative_prompt]), np.int32)
        self._uncond_ids, self._seed = sharding.place(
            (self._uncond_tokens, np.uint32(seed)), (replicated, replicated)
        )
        self._generate = jax.jit(
            make_generate_fn(model, settings),
            in_shardings=(param_shardings, batch_sharding, replicated, batch_sharding, replicated),
            out_shardings=batch_sharding,
        )
        if jax.process_count() > 1:
            # The first batch's collectives must start on every process together (CPU).
            batch = (self.global_batch,)
            self._generate = hosts.compile_together(
                self._generate,
                self.params,
                jax.ShapeDtypeStruct(
                    batch + self._uncond_tokens.shape[1:], np.int32, sharding=batch_sharding
                ),
                self._uncond_ids,
                jax.ShapeDtypeStruct(batch, np.uint32, sharding=batch_sharding),
                self._seed,
            )

    def set_params(self, params: Params) -> None:
        """Swaps in other parameters of the same shapes (e.g. a run's later step), reusing
        the compiled sampler."""
        params = {k: params[k] for k in ("unet", "vae", "text_encoder")}
        self.params = sharding.place(params, self._param_shardings)

    def iterate(
        self, prompts: Sequence[str], image_seeds: Sequence[int], pad_to: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (offset, float32 [n, H, W, 3] images in [0, 1]) batch by batch.

        Args:
          prompts: this process's prompts.
          image_seeds: one non-negative int < 2**32 per prompt.
          pad_to: run as many batches as `pad_to` prompts need (multi-host: the same
            number on every process); the padding's images are dropped.
        """
        if len(prompts) != len(image_seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(image_seeds)} image seeds")
        seeds = np.asarray(image_seeds, np.int64)
        if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**32):
            raise ValueError("image seeds must lie in [0, 2**32)")
        total = max(len(prompts), pad_to or 0)
        input_ids = np.asarray(self.model.tokenize(list(prompts)), np.int32) if prompts else None
        previous = None
        for offset in range(0, total, self.local_batch):
            count = max(0, min(self.local_batch, len(prompts) - offset))
            ids = np.zeros((self.local_batch, self._uncond_tokens.shape[1]), np.int32)
            ids[:] = self._uncond_tokens[0]  # Padding rows: the negative prompt, seed 0.
            batch_seeds = np.zeros(self.local_batch, np.uint32)
            if count:
                ids[:count] = input_ids[offset : offset + count]
                batch_seeds[:count] = seeds[offset : offset + count]
            ids, batch_seeds = sharding.global_batch(self.mesh, (ids, batch_seeds))
            images = self._generate(self.params, ids, self._uncond_ids, batch_seeds, self._seed)
            # Dispatch is asynchronous: fetch the previous batch only now, so the device
            # denoises this one while the caller writes the last one out.
            if previous is not None:
                yield previous[0], _local_rows(previous[2])[: previous[1]]
            previous = (offset, count, images) if count else None
        if previous is not None:
            yield previous[0], _local_rows(previous[2])[: previous[1]]

    def generate(
        self, prompts: Sequence[str], image_seeds: Sequence[int], progress_bar: bool = True
    ) -> np.ndarray:
        """uint8 [N, H, W, 3] images, one per prompt."""
        height = self.model.resolution
        out = np.zeros((len(prompts), height, height, 3), np.uint8)
        bar = tqdm(total=len(prompts), desc="sampling", unit="image", disable=not progress_bar)
        with bar as progress:
            for offset, images in self.iterate(prompts, image_seeds):
                out[offset : offset + len(images)] = to_uint8(images)
                progress.update(len(images))
        return out


def make_sampler(
    config: ml_collections.ConfigDict,
    group: ml_collections.ConfigDict,
    model: models.StableDiffusion,
    params: Params,
    devices: Sequence[jax.Device] | None = None,
) -> Sampler:
    """A `Sampler` on `config.mesh` with the sampler fields of `group` (`sample`/`negatives`)."""
    return Sampler(
        model,
        params,
        sharding.make_mesh(config.mesh, devices),
        SamplerSettings.from_config(group),
        seed=group.seed,
        batch_per_device=group.batch_per_device,
    )


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(
    images: Sequence[np.ndarray], labels: Sequence[str], columns: int = 0
) -> Image.Image:
    """One image: tiles in rows of `columns` (0: about square), each label under its tile."""
    if len(images) != len(labels) or not images:
        raise ValueError(
            f"need as many labels as images (> 0), got {len(images)} and {len(labels)}"
        )
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    side = images[0].shape[0]
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(scratch, label, font, side - 4) for label in labels]
    line_height = scratch.textbbox((0, 0), "Ag", font=font)[3] + 2
    text_height = line_height * max(len(w) for w in wrapped) + 4
    grid = Image.new("RGB", (columns * side, rows * (side + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % columns) * side, (i // columns) * (side + text_height)
        grid.paste(Image.fromarray(image), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + side + 2 + j * line_height), line, fill="black", font=font)
    return grid


def split_prompts(config: ml_collections.ConfigDict, split: str) -> list[str]:
    """The evaluation prompts: `sample.prompt_template` over the captions of data `split`,
    `{style}` each example's style word (`train.style_token`; its style's under
    `data.styles`)."""
    from nsync_jax.data import sources, styles  # Only this path reads data.

    # Whatever split field the source reads is overridden (each style's too).
    data_config = styles.with_split(config.data, split)
    positives, index = sources.load_styled(data_config, config.model.resolution)
    tokens = styles.example_tokens(positives.ids, index, config.train.style_token)
    return [
        config.sample.prompt_template.format(caption=c, style=t)
        for c, t in zip(positives.captions, tokens, strict=True)
    ]


def sample_to_dir(
    config: ml_collections.ConfigDict,
    prompts: Sequence[str],
    out_dir: str,
    num_per_prompt: int = 1,
    model_and_params: tuple[models.StableDiffusion, Params] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> list[str]:
    """Writes `num_per_prompt` PNGs per prompt, `prompts.jsonl` and a labelled `grid.png`.

    Image j of prompt i has image seed `i * num_per_prompt + j` under `sample.seed`.
    Uses the base model unless `model_and_params` is given. Returns the PNG paths.
    """
    if not prompts:
        raise ValueError("no prompts to sample")
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    if model_and_params is None:
        from nsync_jax import runs  # Only this path loads a model (and its weight readers).

        model_and_params = runs.build_base(config)
    model, params = model_and_params
    sampler = make_sampler(config, config.sample, model, params, devices)
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    images = generate_all_processes(sampler, expanded, list(range(len(expanded))))
    images = [resize(image, config.sample.size) for image in images]
    if jax.process_index() != 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with open(os.path.join(out_dir, "prompts.jsonl"), "w") as f:
        for i, (prompt, image) in enumerate(zip(expanded, images, strict=True)):
            path = os.path.join(out_dir, f"{i:05d}.png")
            Image.fromarray(image).save(path)
            paths.append(path)
            record = {"file": os.path.basename(path), "prompt": prompt}
            f.write(json.dumps({**record, "seed": config.sample.seed, "image_seed": i}) + "\n")
    labelled_grid(images, expanded).save(os.path.join(out_dir, "grid.png"))
    return paths


def generate_all_processes(
    sampler: Sampler,
    prompts: Sequence[str],
    image_seeds: Sequence[int],
    progress_bar: bool = True,
) -> np.ndarray:
    """uint8 images for all `prompts`, each process generating a share; every process
    gets them all. The progress bar is shown on one process only."""
    processes = jax.process_count()
    if processes == 1:
        return sampler.generate(prompts, image_seeds, progress_bar)
    from jax.experimental import multihost_utils

    share = -(-len(prompts) // processes)
    start = jax.process_index() * share
    mine = np.zeros((share, sampler.model.resolution, sampler.model.resolution, 3), np.uint8)
    local = list(range(start, min(start + share, len(prompts))))
    for offset, images in sampler.iterate(
        [prompts[i] for i in local], [image_seeds[i] for i in local], pad_to=share
    ):
        mine[offset : offset + len(images)] = to_uint8(images)
    gathered = np.asarray(multihost_utils.process_allgather(mine))
    return gathered.reshape((-1,) + mine.shape[1:])[: len(prompts)]
