"""One-time conversion of third-party weights into the safetensors files our evaluations load:

    python -m oneflow_jax.convert_weights --inception_pth pt_inception-2015-12-05-6726825d.pth --out F.safetensors

  --inception_pth  pytorch-fid's FID Inception (https://github.com/mseitzer/pytorch-fid/releases/download/
                   fid_weights/pt_inception-2015-12-05-6726825d.pth), for evals/fid.py; reading it needs torch.

Exactly one source flag per run. Each source is a flag and an entry of CONVERTERS (source file, out path).
"""
from __future__ import annotations

from absl import app, flags

from oneflow_jax import cli
from oneflow_jax.convert.safetensors_io import SafetensorsError
from oneflow_jax.evals import inception

FLAGS = flags.FLAGS
flags.DEFINE_string("inception_pth", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth to convert.")
flags.DEFINE_string("out", None, "The safetensors file to write.")

# source flag -> converter(source path, out path)
CONVERTERS = {
    "inception_pth": inception.convert_weights,
}


def main(argv):
    cli.no_extra_args(argv)
    given = [name for name in CONVERTERS if FLAGS[name].value]
    if len(given) != 1:
        raise cli.UserError(f"pass exactly one of {', '.join('--' + n for n in CONVERTERS)}"
                            + (f" (got {', '.join('--' + n for n in given)})" if given else ""))
    if not FLAGS.out:
        raise cli.UserError("--out is required (the safetensors file to write)")
    source = FLAGS[given[0]].value
    try:
        CONVERTERS[given[0]](source, FLAGS.out)
    except SafetensorsError as e:                      # names / shapes that differ from the expected network
        raise cli.UserError("; ".join(line.strip() for line in str(e).splitlines())) from None
    cli.say(f"wrote {FLAGS.out} (from {source})")


if __name__ == "__main__":
    app.run(cli.run_cli(main), flags_parser=cli.parse_flags)
