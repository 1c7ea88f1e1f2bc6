"""The encoder-decoder Transformer (Vaswani et al. 2017) from npgpt's hand-written layers, with an
English -> Malay corpus made from Unicode CLDR data.

    from npgpt.seq2seq import Seq2Seq, Seq2SeqConfig
    model = Seq2Seq(Seq2SeqConfig(src_vocab_size=V, tgt_vocab_size=V))
    logits, loss, cache = model.forward(src, tgt_in, targets, training=True)
    grads = model.backward(cache)

Commands: `npgpt seq2seq train | translate | eval` (cli.py).
"""

from .config import Seq2SeqConfig
from .model import Seq2Seq, Seq2SeqCache, init_params, param_shapes

__all__ = ["Seq2Seq", "Seq2SeqCache", "Seq2SeqConfig", "init_params", "param_shapes"]
