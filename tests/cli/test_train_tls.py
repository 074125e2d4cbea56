"""`tuneforge sft --tls_ca --tls_client_cert --tls_client_key` against dataprep and trainer
services that require mutual TLS: the command prepares through dataprep and submits to the
trainer over TLS, and the training process the trainer starts reads its shards from
dataprep over TLS too (the client settings travel in its environment)."""

import json

import pytest

from cli.main import main as tuneforge
from libs.common import channels, checkpoint, tls
from libs.common.server import create_server
from services.dataprep.config import DataprepServerConfig
from services.dataprep.servicer import DataprepServicer, register as register_dataprep
from services.trainer.jobs import JobManager
from services.trainer.servicer import register as register_trainer


@pytest.mark.slow
def test_sft_over_mutual_tls_end_to_end(tmp_path, tls_files, monkeypatch, capsys):
    for env in (channels.ENV_CA, channels.ENV_CERT, channels.ENV_KEY):
        monkeypatch.setenv(env, "")  # recorded, so what the command sets is undone after the test
        monkeypatch.delenv(env)
    server_tls = tls.ServerTLS(tls_files.server_cert, tls_files.server_key, client_ca=tls_files.ca)
    servicer = DataprepServicer(DataprepServerConfig())
    dataprep, dataprep_port, _ = create_server("127.0.0.1:0", register_dataprep(servicer), "dataprep",
                                               tls_config=server_tls)
    jobs = JobManager(max_concurrent_jobs=1, torch_threads=1)
    trainer, trainer_port, _ = create_server("127.0.0.1:0", lambda s: register_trainer(s, jobs), "trainer",
                                             tls_config=server_tls)
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": "I am Ada."}]}) + "\n"
                           for q in ("who are you?", "What is your name?")))
    try:
        code = tuneforge(["sft", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                          "--lora_rank", "4", "--dataprep_address", f"127.0.0.1:{dataprep_port}",
                          "--trainer_address", f"127.0.0.1:{trainer_port}", "--tls_ca", tls_files.ca,
                          "--tls_client_cert", tls_files.client_cert, "--tls_client_key", tls_files.client_key])
        err = capsys.readouterr().err
        assert code == 0, err
        assert [p.name for p in checkpoint.checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    finally:
        jobs.shutdown()
        trainer.stop(1).wait()
        servicer.shutdown(1)
        dataprep.stop(1).wait()
