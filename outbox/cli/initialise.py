"""``outbox init`` (a commented config file) and ``outbox systemd`` (the units)."""

from __future__ import annotations

from pathlib import Path

import click

from outbox import install
from outbox.cli.app import Outbox, fail, main, pass_outbox


@main.command("init")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Fill in a key, e.g. database.url=postgresql://… (repeatable).",
)
@pass_outbox
def init(obj: Outbox, path: Path | None, settings: tuple[str, ...]) -> None:
    """Write a commented config file to PATH (default: --config); never overwrites."""
    target = path or (Path(obj.config_path) if obj.config_path else None)
    if target is None:
        fail("give the file to write: outbox init /etc/outbox/outbox.toml")
    install.write_config(target, settings)
    click.echo(f"wrote {target} (mode 0640): edit it, then `outbox --config {target} db current`")


@main.command("systemd")
@click.option("--print", "print_units", is_flag=True, help="Print the units to stdout.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Write the units there, e.g. /etc/systemd/system.",
)
@click.option("--force", is_flag=True, help="With --dir: replace units already there.")
@pass_outbox
def systemd_units(obj: Outbox, print_units: bool, directory: Path | None, force: bool) -> None:
    """The systemd units for this installation: its `outbox` and the --config file."""
    if not obj.config_path:
        fail("pass --config PATH (or OUTBOX_CONFIG): the units name the config file")
    if print_units == (directory is not None):
        fail("pass either --print or --dir DIR")
    rendered = install.units(Path(obj.config_path))
    if directory is None:
        click.echo(install.printed_units(rendered), nl=False)
        return
    for written in install.write_units(directory, rendered, force=force):
        click.echo(f"wrote {written}")
