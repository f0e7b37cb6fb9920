"Worker of tests/test_ssl.py::test_queue_and_center_across_ranks: two gloo processes update a DINO centre and a MoCo queue"
import torch

def ranks(rank, world, port, out):
    import torch.distributed as dist
    from fastcls.ssl.methods import gather, update_center, enqueue
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        t = torch.arange(12.).view(2, 3, 2) + 100*rank  # (views, batch, dim): a different batch on each rank
        center,queue,ptr = torch.zeros(1, 1, 2),torch.zeros(8, 2),torch.zeros(1, dtype=torch.long)
        update_center(center, t, 0.5)
        enqueue(queue, ptr, gather(t[0]))
        torch.save(dict(center=center, queue=queue, ptr=ptr), out/f'{rank}.pt')
    finally: dist.destroy_process_group()
