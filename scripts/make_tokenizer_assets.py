"""Write the small CLIP BPE vocabulary shipped in innercontrol/assets/tokenizer (run once; output is committed).

The vocabulary holds every byte symbol (so any text round-trips) plus whole-word merges for the words of
the synthetic captions and common prompt words.
"""

import json
from pathlib import Path

WORDS = """a an the of on in at and with photo picture painting image scene view room living bedroom kitchen
red green blue yellow orange purple pink white black gray brown dark light bright big small large tiny
circle square triangle ball box cube sphere disc ring star shape shapes object objects near far front behind
background foreground striped dotted checkered plain textured wall floor sky grass street road house tree
cat dog man woman person people car city street flowers table sofa chair window mountain lake beach sunset
high quality best worst low detailed realistic close up left right top bottom center middle over under
one two three four five many some is are closer further away""".split()


def bytes_to_unicode() -> dict[int, str]:
    # Byte-level BPE maps each byte to a printable unicode symbol; the printable ASCII/Latin-1 ranges map to
    # themselves and the rest are shifted above 255.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def main() -> None:
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    known = set(vocab)
    for word in sorted(set(WORDS)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            merged = current + nxt
            if merged not in known:
                merges.append(f"{current} {nxt}")
                vocab.append(merged)
                known.add(merged)
            current = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(__file__).resolve().parents[1] / "innercontrol" / "assets" / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main()
