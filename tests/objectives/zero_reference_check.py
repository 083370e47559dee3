"""Run by test_reference_under_deepspeed: a real DeepSpeed engine (gloo, CPU, world size 1)
under ZeRO stage N; the reference built from it must hold the full, unpartitioned weights."""

import os
import socket
import sys

import torch


def main(stage: int) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    sock.close()
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 35-70 s JIT build
    deepspeed.init_distributed(dist_backend="gloo")
    from dinor1.model.dino_r1 import DinoR1
    from dinor1.model.presets import tiny_cpu
    from dinor1.objectives.reference import ReferenceModel

    torch.manual_seed(0)
    model = DinoR1(tiny_cpu())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), model_parameters=params,
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}})
    if stage == 3:
        assert any(p.numel() == 0 for p in engine.module.parameters()), "not partitioned"
    reference = ReferenceModel(engine, refresh="epoch")
    got = reference.model.state_dict()
    # every weight its forward uses, gathered whole (the text encoder's and decoder's are not
    # kept: reference.pruned)
    bad = [k for k in expected if k not in reference.pruned and not torch.equal(expected[k], got[k])]
    assert not bad, bad[:5]
    assert reference.pruned and all(got[k].numel() == 0 for k in reference.pruned)
    print(f"ZeRO-{stage}: reference holds {len(got) - len(reference.pruned)} full tensors")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
