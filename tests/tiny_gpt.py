"""Tiny random-weight GPTs for the GPT and PAR tests, and a one-thread fixture for them."""
import pytest
import torch

from varcore.models.gpt import ModelArgs, Transformer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a loaded shared machine makes two threads much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(M=2, grid=4, dim=32, n_layer=2, n_head=2, vocab=16, classes=4, seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, block_size=grid * grid,
                                  num_classes=classes, spe_token_num=M * M - 1, ar_token_num=M * M, **kw))
    for p in model.parameters():  # the official init zeroes the head; random weights make every logit matter
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()
