"""`python -m prime_jax.plan`: the memory plan's command line (see `prime_jax.plan`'s docstring)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

import prime_jax.plan
from prime_jax import cli
from prime_jax.plan.report import DEFAULT_HEADROOM, PROGRAMS, TARGETS


def _parse_targets(text: str) -> dict:
    if not text:
        return dict(TARGETS)
    out = {}
    for item in text.split(","):
        item = item.strip()
        if "=" in item:
            name, gib = item.split("=", 1)
            out[name.strip()] = float(gib)
        else:
            out[item] = TARGETS[item]
    return out


def _set_fake_devices(n: int) -> None:
    """Must run before the first jax backend use: N fake CPU devices, CPU only."""
    flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags_ + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # here, after XLA_FLAGS is set: the fake devices exist only if jax starts after it

    jax.config.update("jax_platforms", "cpu")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # older jax: the XLA flag does it
        pass


def _define_flags() -> flags.FlagValues:
    FLAGS = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/qwen7b.py:v4-64", flag_values=FLAGS,
                                    lock_config=False)
    flags.DEFINE_string("config_json", "", "a config as JSON (used by check_fits' subprocess)", flag_values=FLAGS)
    flags.DEFINE_integer("devices", 0, "fake CPU devices to plan for (0: the preset's device count)", flag_values=FLAGS)
    flags.DEFINE_string("targets", "", "comma list of targets (v4,v5e,v5p,h100) or name=GiB; default all four",
                        flag_values=FLAGS)
    flags.DEFINE_float("headroom", DEFAULT_HEADROOM, "fraction of HBM a phase may use", flag_values=FLAGS)
    flags.DEFINE_string("programs", ",".join(PROGRAMS), "which programs to compile", flag_values=FLAGS)
    flags.DEFINE_integer("sample_prompts", 0, "prompts per generate call (0: oversample * prompts_per_step)",
                         flag_values=FLAGS)
    flags.DEFINE_string("json_out", "", "also write the report as JSON here", flag_values=FLAGS)
    flags.DEFINE_string("title", "", "title of the table", flag_values=FLAGS)
    flags.DEFINE_bool("quiet", False, "no progress lines on stderr", flag_values=FLAGS)
    flags.DEFINE_bool("strict", False, "exit with status 1 when some target does not fit", flag_values=FLAGS)
    flags.DEFINE_float("response_p50", 0, "median response length of the rollout estimate "
                       "(0: rollout.max_new_tokens / 6)", flag_values=FLAGS)
    flags.DEFINE_float("response_p90", 0, "90th-percentile response length of the rollout estimate "
                       "(0: rollout.max_new_tokens / 2)", flag_values=FLAGS)
    flags.DEFINE_bool("list_fields", False, "print every field of --config and exit", flag_values=FLAGS)
    return FLAGS


def _error(message: str) -> int:
    print(f"prime_jax.plan: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    FLAGS = _define_flags()
    argv = list(sys.argv if argv is None else argv)
    if any(a in cli.HELP_ARGS for a in argv[1:]):
        cli.print_text(cli.help_text("plan", prime_jax.plan.__doc__, [name for name in FLAGS if name != "config_json"],
                                     flag_values=FLAGS))
        return 0
    try:
        FLAGS(argv)
        config = FLAGS.config
        if config is not None:
            config.name  # noqa: B018 - raises for the placeholder of a config file that did not load
    except flags.Error as e:
        return _error(cli.flag_error(e, argv))
    except cli.FLAG_ERRORS as e:
        return _error(cli.flag_error(e, argv))
    if FLAGS.config_json:
        config = ml_collections.ConfigDict(json.loads(Path(FLAGS.config_json).read_text()))
        title = FLAGS.title
    elif config is not None:
        title = FLAGS.title or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    else:
        return _error("--config is required (e.g. --config=configs/qwen7b.py:v4-64); --help says more")
    if FLAGS.list_fields:
        cli.list_fields(config, argv, "")
        return 0
    devices = FLAGS.devices
    preset = config.mesh.get("preset", "") if "mesh" in config else ""
    if not devices:
        if not preset:
            return _error("--devices is required when the config has no mesh.preset")
        from prime_jax.parallel import mesh_preset  # loads jax: only now, as the fake devices come next

        devices = mesh_preset(preset)["devices"]
    _set_fake_devices(devices)
    return _plan(config, FLAGS, devices, title)


def _plan(config, FLAGS, devices: int, title: str) -> int:
    """Validates the config for `devices`, plans it, prints the report (and the rollout estimate)."""
    # Imported here, after `_set_fake_devices`: the plan runs on the fake CPU devices it just set up.
    import jax

    from prime_jax.config import ConfigError, validate
    from prime_jax.models.config import UnsupportedModelError
    from prime_jax.parallel import mesh_from_config
    from prime_jax.plan import memory
    from prime_jax.train.builder import RunBuilder

    try:
        validate(config, num_devices=devices)
    except ConfigError as e:
        msg = str(e)
        if not msg.startswith(("model.path", "tokenizer.path", "data.")):  # plan needs no weights or data
            return _error(f"config {msg}")
    try:
        report = memory.plan_memory(config, jax.devices(), targets=_parse_targets(FLAGS.targets),
                                    headroom=FLAGS.headroom, programs=[p for p in FLAGS.programs.split(",") if p],
                                    sample_prompts=FLAGS.sample_prompts, title=title, verbose=not FLAGS.quiet)
    except (UnsupportedModelError, FileNotFoundError) as e:  # the model's architecture could not be read
        print(f"plan: model.path: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(report.format())
    if not FLAGS.config_json:  # check_fits' subprocess wants the memory report only
        builder = RunBuilder(config, mesh_from_config(config, jax.devices()))
        print("\n".join(memory.rollout_estimate(builder, sample_prompts=FLAGS.sample_prompts,
                                                 p50=FLAGS.response_p50, p90=FLAGS.response_p90)))
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(report.to_dict()))
    if FLAGS.strict and not all(report.fits(t) for t in report.targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
