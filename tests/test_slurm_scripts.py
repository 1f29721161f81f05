"""Unit tests of the SLURM helpers: batch scripts and command output, no SLURM needed."""
from __future__ import annotations

import pytest

from cw.client import discovery
from cw.client.discovery import JobInfo, SlurmError
from cw.launch import slurm
from cw.launch.slurm import Options


def directives(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_master_script_publishes_its_address_and_is_named_for_the_cluster():
    script = slurm.render_master_script(Options(name="exp1", partition="gpu", account="lab", time="2:00:00",
                                                extra_lines=["module load python"]))
    assert script.startswith("#!/bin/bash\n")
    d = directives(script)
    assert "--job-name=cw-exp1-master" in d and "--partition=gpu" in d and "--account=lab" in d
    assert "--time=2:00:00" in d and "--ntasks=1" in d
    assert "module load python" in script
    assert "-m cw.master --bind 0.0.0.0 --port 0 --address-file" in script
    assert f"--address-file {slurm.address_file('exp1')}" in script
    assert "secret" not in script.lower()   # the secret never travels in a batch script


def test_master_job_is_requeued_and_restarts_a_crashed_master():
    script = slurm.render_master_script(Options(name="exp1", master_restarts=3))
    assert "--requeue" in directives(script)        # its node fails: SLURM starts it elsewhere
    assert "for attempt in $(seq 0 3)" in script    # it crashes: the batch script starts it again
    assert f"rm -f {slurm.address_file('exp1')}" in script
    assert "--advertise" not in script
    ip = slurm.render_master_script(Options(name="exp1", advertise="ip"))
    assert '--advertise "$(hostname -I' in ip


def test_a_failed_node_costs_the_workers_job_only_its_own_workers():
    script = slurm.render_worker_script(Options(name="exp1", workers=3))
    assert "--no-kill" in directives(script)
    assert script.strip().splitlines()[-1].startswith("srun --no-kill ")


def test_worker_script_runs_n_tasks_under_srun_and_drains_before_the_limit():
    script = slurm.render_worker_script(Options(name="exp1", workers=3, mem="4G", cpus_per_worker=2,
                                                drain_seconds=90))
    d = directives(script)
    assert "--job-name=cw-exp1-workers" in d and "--ntasks=3" in d and "--cpus-per-task=2" in d
    assert "--mem=4G" in d and "--signal=TERM@90" in d
    assert script.strip().splitlines()[-1].startswith("srun ")
    assert "-m cw.worker slurm:exp1" in script


def test_worker_array_script_signals_the_batch_shell():
    d = directives(slurm.render_worker_script(Options(name="a", workers=4, array=True)))
    assert "--array=0-3" in d and "--ntasks=1" in d and any(x.startswith("--signal=B:TERM@") for x in d)


def test_isolated_workers_get_a_node_each():
    d = directives(slurm.render_worker_script(Options(workers=2, isolated=True)))
    assert "--ntasks-per-node=1" in d and "--exclusive" in d


def test_docker_workers_run_the_image_with_the_shared_home():
    command = slurm.worker_command(Options(name="d", docker_image="me/cw:1", docker_args="--gpus all"))
    assert command[:3] == ["docker", "run", "--rm"]
    assert "--gpus" in command and "me/cw:1" in command
    image = command.index("me/cw:1")
    assert command[image + 1:] == ["-m", "cw.worker", "slurm:d", "--connect-timeout", "600",
                                  "--port", "0"]


@pytest.mark.parametrize("output, jobid", [("12345\n", "12345"), ("777;cluster2\n", "777"),
                                           ("Submitted\n42\n", "42")])
def test_sbatch_parsable_output(output, jobid):
    assert slurm.parse_sbatch(output) == jobid


@pytest.mark.parametrize("output", ["", "sbatch: error: Batch job submission failed\n"])
def test_sbatch_output_without_a_job_id_is_an_error(output):
    with pytest.raises(SlurmError, match="no job id"):
        slurm.parse_sbatch(output)


def test_squeue_output_parsing():
    text = "101|cw-x-master|RUNNING|node7|None\n102_3|cw-x-workers|PENDING||Resources\n\n"
    assert discovery.parse_squeue(text) == [JobInfo("101", "cw-x-master", "RUNNING", "node7", "None"),
                                        JobInfo("102_3", "cw-x-workers", "PENDING", "", "Resources")]
    with pytest.raises(SlurmError, match="unexpected squeue line"):
        discovery.parse_squeue("garbage line\n")


def test_a_stale_address_file_of_an_ended_job_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_STATE_DIR", str(tmp_path))
    path = discovery.address_file("old")
    path.parent.mkdir(parents=True)
    path.write_text('{"host": "n1", "port": 4000, "pid": 1, "job": null}')
    assert discovery.read_address("old") == ("n1", 4000)   # no job recorded: taken as it is
    path.write_text('{"host": "n1", "port": 4000')      # half a file
    assert discovery.read_address("old") is None
