"""A real one-node Slurm (tools/slurm_local.sh): sbatch + sacct + submitit.

Skips when not root or when the packages can't be installed; see slurm_fixture.py.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def test_sbatch_and_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "job-%j.out"
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "-p", slurm_cluster.partition, "--mem", "100M",
        "-t", "5", "-J", "slurm-local-hi", "-o", str(out), "--wrap", "echo hi",
    ).strip().split(";")[0]
    assert job_id.isdigit(), job_id
    assert slurm_cluster.wait(job_id) == "COMPLETED"
    # the exact check submitit/dora rely on: accounting knows the job
    states = slurm_cluster.run("sacct", "-j", job_id, "-n", "-o", "State").split()
    assert states and set(states) == {"COMPLETED"}, states
    text = Path(str(out).replace("%j", job_id)).read_text()
    assert text.strip() == "hi"


def test_over_asking_job_is_rejected(slurm_cluster):
    # EnforcePartLimits=ALL: an impossible request fails at submit, it does not pend forever
    res = subprocess.run(
        ["sbatch", "-p", slurm_cluster.partition, "--mem", "100000G", "--wrap", "true"],
        env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0, res.stdout


def test_submitit(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")

    def poly(x: int) -> int:  # nested: cloudpickle ships it by value
        return x * x + 1

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, mem_gb=0.5,
                               cpus_per_task=1, timeout_min=5, name="slurm-local-submitit")
    job = executor.submit(poly, 7)
    assert job.result() == 50, job.stderr()
    # sacct may lag the result file by a moment; state must settle to COMPLETED
    assert slurm_cluster.wait(job.job_id) == "COMPLETED"
    assert job.get_info(mode="force").get("State") == "COMPLETED"  # fresh sacct query
    assert job.state == "COMPLETED", (job.state, job.stderr())


def test_submitit_job_array(slurm_cluster, tmp_path):
    # `dora grid` submits through executor.batch(), i.e. a Slurm job array
    submitit = pytest.importorskip("submitit")

    def double(x: int) -> int:
        return 2 * x

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, mem_gb=0.25,
                               cpus_per_task=1, timeout_min=5, slurm_array_parallelism=2)
    with executor.batch():
        jobs = [executor.submit(double, i) for i in range(3)]
    assert [job.result() for job in jobs] == [0, 2, 4]
    for job in jobs:
        assert "_" in job.job_id  # array task ids: <array>_<index>
        assert slurm_cluster.wait(job.job_id) == "COMPLETED"
        assert job.get_info(mode="force").get("State") == "COMPLETED"
