"""Several styles in one run on the digits testbed: the CPU form of configs/multistyle.py.

Three renderings of scikit-learn's digits (`data/digits.py`: `palette`, `stripes`,
`styled`) are three styles with a token each, in one run of a tiny pixel-space model
(8 px, `model.tiny.identity_vae`), with the SupCon term over style labels on a tiny random
image encoder. No files, no downloads (needs scikit-learn). Run:
    python launch/train.py --config configs/multistyle_digits.py --workdir /tmp/multi-digits
NSYNC needs a negatives store for these ids (launch/generate_negatives.py with this
config); the benchmark (benchmarks/style_benchmark.py) pretrains a base on plain digits.
"""

from configs import default

RENDERINGS = ("palette", "stripes", "styled")


def get_config():
    config = default.get_config()
    config.model.source = "tiny"
    config.model.resolution = 8
    config.model.tiny.vae_channels = (32,)
    config.model.tiny.identity_vae = True
    config.model.tiny.max_length = 32  # The longest digits prompt with a style token fits.
    config.data.source = "digits"
    config.data.random_flip = False  # A mirrored digit is another glyph.
    config.data.digits_classes = (0, 1, 2, 3, 4)
    config.data.digits_count = 40  # Per style.
    config.data.styles = tuple(
        {"digits_rendering": r, "token": f"<{r}>", "label": k} for k, r in enumerate(RENDERINGS)
    )
    config.train.mode = "finetune"
    config.train.scope = "textual_inversion"
    config.train.initializer_token = "drawing"
    config.train.batch_size = 8
    config.train.num_steps = 300
    config.train.supcon_weight = 0.1
    config.train.supcon_encoder = "tiny"
    config.optim.learning_rate = 5e-3
    config.log.every = 25
    config.checkpoint.every = 100
    config.mesh.data = -1
    return config
