"""Hidden states of a pretrained Hugging Face text encoder for `sgjax.text_embed --encoder=npz:`.

Runs outside sgjax's environment, which pins no PyTorch: in one with torch and transformers
(`pip install torch transformers`), from a local checkpoint folder (no download):

    python launch/embed_captions_hf.py --captions=/data/cc/captions.jsonl \
        --model=/models/t5-v1_1-xxl --max_length=256 --out=/data/cc/t5.npz
    python -m sgjax.text_embed --captions=/data/cc/captions.jsonl --encoder=npz:/data/cc/t5.npz \
        --config=configs/t2i.py --config.model.text_length=256 --config.model.text_width=4096 \
        --vae=/models/sd-vae-ft-ema --out=/data/cc_t2i

--captions is the JSON Lines file `sgjax.text_embed` takes; its non-blank lines' captions are
encoded in order. The encoder: an encoder-decoder checkpoint (T5) runs its encoder; any other
(Gemma 3, Llama, ...) gives its last layer's hidden states. Captions are padded to
--max_length tokens; a caption with more tokens is refused (never truncated silently), naming
the line. Writes an .npz of `text` [N, max_length, width] (--dtype), `mask` [N, max_length]
(the tokenizer's attention mask) and `captions` [N] (str).
"""

import argparse
import json
import sys

import numpy as np
import torch
import transformers


def read_captions(path: str) -> list[tuple[int, str]]:
  """(line number, caption) of every non-blank line, as `sgjax.text_embed` reads them."""
  with open(path, encoding="utf-8") as f:
    entries = [(number, json.loads(line)["caption"]) for number, line in enumerate(f, 1)
               if line.strip()]
  if not entries:
    sys.exit(f"--captions={path!r} holds no captions.")
  return entries


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--captions", required=True, help="JSON Lines: {\"image\", \"caption\"}.")
  parser.add_argument("--model", required=True, help="Local Hugging Face checkpoint folder.")
  parser.add_argument("--max_length", type=int, required=True,
                      help="Padded token count (the model's model.text_length).")
  parser.add_argument("--out", required=True, help="The .npz to write.")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                      help="Stored hidden states (the encoder runs in float32).")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  args = parser.parse_args()

  entries = read_captions(args.captions)
  captions = [caption for _, caption in entries]
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
  if tokenizer.pad_token is None:  # Llama's and others': pad with EOS, masked out anyway
    tokenizer.pad_token = tokenizer.eos_token
  lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
  too_long = [(line, n) for (line, _), n in zip(entries, lengths) if n > args.max_length]
  if too_long:
    line, n = too_long[0]
    sys.exit(f"--captions line {line} has {n} tokens, more than --max_length={args.max_length}"
             f" ({len(too_long)} captions in all): raise --max_length (and the model's"
             " text_length) or shorten them.")
  config = transformers.AutoConfig.from_pretrained(args.model)
  if config.model_type == "t5":  # the encoder's weights only
    model = transformers.T5EncoderModel.from_pretrained(args.model, torch_dtype=torch.float32)
  else:
    model = transformers.AutoModel.from_pretrained(args.model, torch_dtype=torch.float32)
    if config.is_encoder_decoder:
      model = model.get_encoder()
  model.to(args.device).eval()

  texts, masks = [], []
  with torch.no_grad():
    for start in range(0, len(captions), args.batch_size):
      batch = tokenizer(captions[start:start + args.batch_size], padding="max_length",
                        max_length=args.max_length, return_tensors="pt").to(args.device)
      out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
      texts.append(out.last_hidden_state.float().cpu().numpy().astype(args.dtype))
      masks.append(batch["attention_mask"].bool().cpu().numpy())
  text, mask = np.concatenate(texts), np.concatenate(masks)
  np.savez(args.out, text=text, mask=mask, captions=np.array(captions, dtype=str))
  print(f"{len(captions)} captions -> {args.out}: text {text.dtype} {text.shape}")


if __name__ == "__main__":
  main()
