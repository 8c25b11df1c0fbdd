"""Tiny random rerankers: BERT and XLM-R cross-encoders saved by sentence-transformers' CrossEncoder
(the on-disk format levante reads), and a tiny Qwen3 whose tokenizer has the "yes" and "no" tokens a
Qwen3-Reranker-style LLM reranker reads; with their references (CrossEncoder.predict, transformers)."""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import VOCAB

TEXT = ["The quick brown fox jumps over the lazy dog. " * 4, "def add(a, b):\n    return a + b\n",
        "Bonjour, ça va? 你好，世界。 🙂", "Rotary position embeddings rotate queries and keys."]
# Qwen3-Reranker's prompt, as its model card writes it.
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def _pair_tokenizer(folder: Path, kind: str) -> None:
    """A WordPiece-free byte-level BPE with the family's pair template: BERT's [CLS] A [SEP] B [SEP]
    (token types 0, then 1), XLM-R's <s> A </s></s> B </s> (all type 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bert = kind == "bert"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=specials[1] if bert else specials[3]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                       unk_token="[UNK]", model_max_length=128,  # as BertTokenizer's, with types
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B:0 </s>:0",
            special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", cls_token="<s>", sep_token="</s>", model_max_length=128)
    fast.save_pretrained(folder)


def build_cross_encoder(folder: Path, kind: str = "bert") -> Path:
    """`kind` bert or xlm-roberta: a *ForSequenceClassification with one label, saved by CrossEncoder."""
    import transformers as tf
    from sentence_transformers import CrossEncoder

    base = folder.parent / (folder.name + "-base")
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_labels=1, initializer_range=0.2)
    torch.manual_seed(0)
    if kind == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**common, max_position_embeddings=128, pad_token_id=0))
    else:
        config = tf.XLMRobertaConfig(**common, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2)
        model = tf.XLMRobertaForSequenceClassification(config)
    _randomize_layer_norms(model)
    model.to(torch.float32).save_pretrained(base)
    _pair_tokenizer(base, kind)
    CrossEncoder(str(base), device="cpu").save_pretrained(str(folder))
    return folder


def _randomize_layer_norms(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def build_llm_reranker(folder: Path) -> Path:
    """tests/tiny_models.py's qwen3, its tokenizer given "yes" and "no" tokens."""
    from transformers import AutoTokenizer

    import tiny_models

    tiny_models.build("qwen3", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["yes", "no"])
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(folder)
    return folder


def llm_reranker_scores(folder: Path, query: str, documents: list[str], max_length: int = 8192) -> list[float]:
    """Qwen3-Reranker's model-card recipe with transformers: P(yes) against P(no) at the last token."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    scores = []
    for document in documents:
        body = f"<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
        ids = tokenizer(body, add_special_tokens=False, truncation=True,
                        max_length=max_length - len(prefix) - len(suffix))["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prefix + ids + suffix])).logits[0, -1]
        pair = torch.stack([logits[no], logits[yes]]).log_softmax(-1)
        scores.append(pair[1].exp().item())
    return scores
