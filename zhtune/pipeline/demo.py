"""``zhtune demo``: the whole pipeline on a laptop, offline, on CPU, in a few minutes.

Everything is made here from text that ships with the package: correct Chinese sentences are composed from small
word lists; a byte-level BPE tokenizer (ChatML special tokens) is trained on them; a tiny Qwen2-architecture model is
initialised at random; an instruction set is made from simple tasks on those sentences and a CGEC set by corrupting
them with :mod:`zhtune.gec.noise`. Then the embedded pipeline recipe runs: instruction LoRA → merge → CGEC LoRA →
merge → CGEC evaluation (also of the base and stage-1 models) → report. The numbers mean little (a random model
trained for a minute); the path, the files and the report are the real ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

PEOPLE = ("我", "他", "她", "我们", "老师", "妈妈", "爸爸", "同学们", "小明", "小红", "医生", "我的朋友")
TIMES = ("今天", "昨天", "明天", "周末", "早上", "晚上", "下午", "每天")
PLACES = ("学校", "公园", "图书馆", "超市", "北京", "家里", "医院", "电影院", "海边", "操场")
ACTIVITIES = ("看书", "买东西", "散步", "学习中文", "打篮球", "看电影", "吃饭", "写作业", "唱歌", "休息")
FEELINGS = ("很高兴", "非常累", "有点紧张", "特别开心", "很满意", "有些担心")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def demo_sentences(n: int = 700, seed: int = 0) -> list[str]:
    """Correct, varied, short sentences composed from the word lists above."""
    rng = random.Random(seed)
    patterns = (
        lambda: f"{rng.choice(PEOPLE)}{rng.choice(TIMES)}在{rng.choice(PLACES)}{rng.choice(ACTIVITIES)}。",
        lambda: f"{rng.choice(TIMES)}{rng.choice(PEOPLE)}去{rng.choice(PLACES)}{rng.choice(ACTIVITIES)}了。",
        lambda: f"{rng.choice(PEOPLE)}在{rng.choice(PLACES)}{rng.choice(ACTIVITIES)}以后{rng.choice(FEELINGS)}。",
        lambda: f"因为{rng.choice(TIMES)}要{rng.choice(ACTIVITIES)}，所以{rng.choice(PEOPLE)}{rng.choice(FEELINGS)}。",
        lambda: f"{rng.choice(PEOPLE)}把作业做完了，然后和{rng.choice(PEOPLE)}一起{rng.choice(ACTIVITIES)}。",
    )
    seen, out = set(), []
    while len(out) < n:
        s = rng.choice(patterns)()
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def build_tokenizer(sentences: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = sentences + [
        "请改正下面句子中的语法错误，只输出改正后的句子。",
        "复述下面的句子。",
        "这句话有几个字？",
        "user",
        "assistant",
        "system",
        "You are a helpful assistant.",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    fast.save_pretrained(out)
    return fast


def build_model(tokenizer, sentences: list[str], out: Path, seed: int = 0, steps: int = 300) -> None:
    """A tiny Qwen2 model, briefly pre-trained (all weights) on the demo sentences so that it is a language model
    of them before the LoRA stages start; a purely random base would leave the demo's numbers at zero."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    texts = [s + tokenizer.eos_token for s in sentences]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 32), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)


def build_data(sentences: list[str], out: Path, seed: int = 0) -> dict[str, Path]:
    from zhtune.gec.noise import NoiseGenerator

    rng = random.Random(seed)
    instruct = []
    for s in sentences[:300]:
        task = rng.choice(("repeat", "count", "where"))
        if task == "repeat":
            instruct.append({"instruction": "复述下面的句子。", "input": s, "output": s})
        elif task == "count":
            instruct.append({"instruction": "这句话有几个字？", "input": s, "output": f"这句话有{len(s)}个字。"})
        else:
            place = next((p for p in PLACES if p in s), "不知道")
            instruct.append({"instruction": "这句话提到了哪个地方？", "input": s, "output": place})
    (out / "instruct.json").write_text(json.dumps(instruct, ensure_ascii=False, indent=1), encoding="utf-8")
    noise = NoiseGenerator(seed)
    # a quarter of the sentences stay correct, so over-correction can be measured and the model learns to copy
    pairs = [(f"d{i}", s if i % 4 == 3 else noise.corrupt(s)[0], s) for i, s in enumerate(sentences[300:])]
    splits = {"train": pairs[:280], "dev": pairs[280:340], "test": pairs[340:400]}
    files = {"instruct": out / "instruct.json"}
    for name, rows in splits.items():
        para = out / f"cgec_{name}.para"
        para.write_text("".join(f"{i}\t{src}\t{ref}\n" for i, src, ref in rows), encoding="utf-8")
        files[f"cgec_{name}"] = para
        if name != "train":
            src_file = out / f"cgec_{name}.src.txt"
            src_file.write_text("".join(f"{i}\t{src}\n" for i, src, _ref in rows), encoding="utf-8")
            files[f"cgec_{name}_src"] = src_file
    return files


def demo_pipeline(base: Path, files: dict[str, Path], work: Path) -> dict:
    """The embedded pipeline recipe (instruction LoRA → merge → CGEC LoRA → merge → evaluation)."""
    common_train = {
        "micro_batch_size": 8,
        "grad_accum": 1,
        "warmup_steps": 10,
        "save_every": 100,
        "eval_every": 100,
        "val_size": 16,
        "progress_bar": False,
        "seed": 1,
    }
    model = {"dtype": "fp32", "gradient_checkpointing": False, "attn_implementation": "sdpa"}
    lora = {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": "auto"}
    return {
        "base": str(base),
        "work_dir": str(work),
        "template": "qwen",
        "system": "你是一个中文助手。",
        "stages": [
            {
                "name": "instruct",
                "kind": "sft",
                "recipe": {
                    "model": model,
                    "data": {"paths": [str(files["instruct"])]},
                    "tokenize": {"cutoff_len": 128},
                    "lora": lora,
                    "train": {**common_train, "lr": 1e-2, "max_steps": 200},
                },
            },
            {"name": "merge_instruct", "kind": "merge"},
            {
                "name": "cgec",
                "kind": "sft",
                "recipe": {
                    "model": model,
                    "data": {"paths": [str(files["cgec_train"])], "format": "cgec"},
                    "tokenize": {"cutoff_len": 128},
                    "lora": lora,
                    "train": {**common_train, "lr": 1e-2, "max_steps": 400},
                    "eval": {"cgec": {"data": str(files["cgec_dev"]), "every": 200, "limit": 24, "batch_size": 24}},
                },
            },
            {"name": "merge_cgec", "kind": "merge"},
            {
                "name": "evaluate",
                "kind": "eval_cgec",
                "compare": ["base", "merge_instruct"],
                "batch_size": 30,
                "sets": [
                    {"name": "demo_test", "input": str(files["cgec_test_src"]), "ref": str(files["cgec_test"])},
                    {"name": "demo_dev", "input": str(files["cgec_dev_src"]), "ref": str(files["cgec_dev"])},
                ],
            },
        ],
    }


def prepare_demo(out: Path) -> Path:
    """Build (once) the demo's model, tokenizer, data and pipeline recipe under ``out``; return the recipe path."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "pipeline.yaml"
    if recipe.exists():
        return recipe
    sentences = demo_sentences()
    base, data = out / "base-model", out / "data"
    data.mkdir(exist_ok=True)
    tokenizer = build_tokenizer(sentences, base)
    build_model(tokenizer, sentences, base)
    files = build_data(sentences, data)
    recipe.write_text(
        yaml.safe_dump(demo_pipeline(base, files, out / "run"), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    return recipe
