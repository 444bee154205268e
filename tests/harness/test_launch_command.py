"""The data-parallel launch command: the group it starts is the one the cell asks for, whatever the user's
``accelerate`` config file says, on a port no other cell on the node holds; a worker refuses any other."""

from __future__ import annotations

import pytest
from helpers import compose_cell

from globalcom2.cells import CellSpec
from globalcom2.run import worker_command
from globalcom2.worker import check_world_size


def accelerate_args(tmp_path, monkeypatch, hostile_config: str):
    """The accelerate command for a 4-process cell, parsed and completed by accelerate itself against a
    default config file holding ``hostile_config``."""
    import accelerate.commands.config.config_args as config_args
    import accelerate.commands.launch as launch

    config = tmp_path / "default_config.yaml"
    config.write_text(hostile_config)
    for module in (launch, config_args):  # each holds its own copy of the path
        monkeypatch.setattr(module, "default_config_file", str(config))
    spec = CellSpec.from_config(
        compose_cell(tmp_path, "launcher=accelerate", "launcher.tool=accelerate", "launcher.num_processes=4")
    )
    command = worker_command(spec, tmp_path / "spec.json", tmp_path / "out", tmp_path / ".answers")
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch.launch_command_parser().parse_args(command[3:])
    launch._validate_launch_command(args)
    return args, command


def test_the_accelerate_command_overrides_the_users_default_config(tmp_path, monkeypatch):
    """Without these flags a config of distributed_type NO ran one process (silently, the cell on one GPU),
    and its mixed precision, dynamo backend and GPU ids applied to the cell."""
    hostile = (
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
        "dynamo_config:\n  dynamo_backend: INDUCTOR\ngpu_ids: '0'\nnum_machines: 1\nnum_processes: 1\n"
        "main_process_port: 29500\n"
    )
    args, _ = accelerate_args(tmp_path, monkeypatch, hostile)
    assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp
    assert (args.num_processes, args.num_machines, args.gpu_ids) == (4, 1, "all")
    assert args.mixed_precision == "no" and args.dynamo_backend.lower() == "no"
    assert args.main_process_port not in (None, 29500)


def test_two_cells_launched_together_get_different_ports(tmp_path):
    spec = CellSpec.from_config(compose_cell(tmp_path, "launcher=accelerate", "launcher.tool=torchrun"))
    ports = {worker_command(spec, tmp_path / "s.json", tmp_path / "o", tmp_path / "a")[4] for _ in range(5)}
    assert len(ports) > 1 and all(p.startswith("--master_port=") for p in ports)


def test_a_worker_refuses_a_group_of_another_size():
    check_world_size(4, "4")
    for wrong in ("1", None):
        with pytest.raises(
            RuntimeError, match=rf"WORLD_SIZE={wrong!r}, but the cell asks for .*num_processes=4"
        ):
            check_world_size(4, wrong)
