"""Show-o's tokenizer: phi-1.5 BPE + ``[PAD]`` + 9 task tokens (+ concept tokens), then the image-code ids.

Id layout (Show-o 512x512, phi-1.5): text 0..50294, ``[PAD]`` 50295, ``<|soi|>`` .. ``<|lvg|>`` 50296..50304, then
(UniCTokens) concept tokens, then ``image_offset = len(text tokenizer)``: code ``c`` <-> id ``image_offset + c``,
``mask_id = image_offset + codebook_size``, ``vocab_size = mask_id + 1``. Adding concept tokens moves
``image_offset`` / ``mask_id`` up (the model's image rows move with them, see ``backbone/concepts.py``).

Concept token names (the multi-concept choice): the FIRST concept added gets exactly UniCTokens' names
``<name>`` + ``<token_0>`` .. ``<token_{K-1}>`` (so UniCTokens prompts and checkpoints read the same); every LATER
concept gets ``<name>`` + ``<name_token_0>`` .. so token strings stay unique. Callers must build prompts from
``ConceptTokens.token_strs`` / ``concept_str``, never from hard-coded strings.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from backbone.config import BUILTIN_TINY

SPECIAL_TOKENS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
"""Show-o's task tokens, in the order ``UniversalPrompting`` adds them (after ``[PAD]``)."""
PAD_TOKEN = "[PAD]"
ENDOFTEXT = "<|endoftext|>"

BUILTIN_CORPUS = """\
A photo of a small brown dog sitting on a green sofa in the living room. The dog has long floppy ears, a wet black
nose and a red collar with a silver tag. Every morning the dog waits by the front door for the postman, and every
evening it sleeps in a basket near the warm kitchen window. Its favourite toy is a yellow tennis ball.
A photo of a grey cat with white paws lying on a wooden table next to a blue cup. The cat is curious and quiet. She
likes to watch birds from the balcony, to chase a piece of string, and to hide inside cardboard boxes. Her eyes are
bright green and her tail is striped with dark grey rings.
A young woman with short black hair is smiling at the camera. She wears round glasses, a striped shirt and a golden
necklace. She is a teacher who loves music, plays the piano on weekends, and often travels to the mountains with
her friends. In this picture she stands in front of an old stone bridge over a quiet river.
An old man with a white beard is reading a newspaper on a park bench. He wears a brown hat, a long dark coat and
leather shoes. Behind him there are tall trees with orange and yellow leaves, because it is autumn. A bicycle leans
against the bench, and a few pigeons walk on the path looking for bread crumbs.
A red backpack with two pockets stands on the floor of a bright classroom. Next to it there is a wooden chair, a
white board with numbers, and a window that shows a playground. The backpack belongs to a boy who carries his
books, a water bottle, a pencil case and a green apple to school every day.
A ceramic mug painted with purple flowers sits on a kitchen counter beside a silver kettle, a bowl of fresh fruit and
a loaf of bread. The mug is a gift from a friend and is used for tea in the afternoon. The light from the window
makes the colours look soft and warm.
A photo of a white rabbit in a garden full of tulips. The rabbit has pink ears, a small round tail and soft fur. It
eats carrots and lettuce, hops across the grass, and sleeps in a little house made of wood. Children like to feed it
and to take pictures of it in the sunshine.
A toy robot made of blue and orange plastic stands on a shelf between a stack of comic books and a plant in a pot.
The robot has big round eyes, two antennas and wheels instead of feet. When you press the button on its back, it
lights up, plays a short song and waves its arms.
A photo of a golden retriever running on a sandy beach at sunset. The sky is pink and purple, the sea is calm, and
the waves are small. The dog carries a stick in its mouth and its fur shines in the evening light. Its owner walks
behind it holding a leash and a camera.
A girl in a yellow raincoat is jumping into a puddle on a city street. It is raining, the pavement is wet and the
buildings are grey and tall. Cars with their lights on drive slowly, and people with black umbrellas hurry to the bus
stop. The girl laughs, and her red boots are covered in water.
A vintage camera with a leather strap lies on a map of the city. Around it are old photos, a notebook, a pen and a
cup of coffee. The photographer collects cameras from many countries and takes pictures of markets, bridges,
museums, parks, beaches, mountains and lakes.
A black and white puppy sleeps on a soft blue blanket. It is very small, with tiny paws and a short tail. The puppy
is three months old and loves to play with children, to chew shoes, and to drink milk. Its name is written on a
little tag shaped like a bone.
A man with curly hair and a green jacket is cooking dinner in a small kitchen. He is making pasta with tomato sauce,
fresh basil and cheese. On the wall there is a clock, a calendar and a painting of a sailing boat on the sea.
USER: What is the colour of the dog? ASSISTANT: The dog is brown. USER: Where is the cat? ASSISTANT: The cat is on
the table. USER: Is this a photo of a person? ASSISTANT: Yes, it is a photo of a woman who is smiling.
"""
"""Fixed English corpus for the ``builtin:tiny`` byte-level BPE (people, pets, objects, photos, colours, places)."""


@dataclass
class ConceptTokens:
    """Ids and strings of one concept's added tokens (``<c>`` first, then the learnable tokens)."""

    name: str
    """Concept name (e.g. ``bo``); its identifier token is ``<bo>``."""
    concept_id: int
    """Id of ``<name>``."""
    token_ids: list[int]
    """Ids of the K learnable tokens, in order."""
    concept_str: str
    """``"<name>"``."""
    token_strs: list[str]
    """Strings of the K learnable tokens (``<token_i>`` for the first concept, ``<name_token_i>`` later)."""

    @property
    def all_ids(self) -> list[int]:
        """Concept id then token ids: the checkpoint row order (``epoch_N_embed.pt`` rows)."""
        return [self.concept_id, *self.token_ids]

    @property
    def all_strs(self) -> list[str]:
        """Concept string then token strings (same order as ``all_ids``)."""
        return [self.concept_str, *self.token_strs]

    def tokens_text(self, start: int = 0, stop: int | None = None) -> str:
        """Concatenated token strings ``token_strs[start:stop]`` (e.g. ``"<token_0><token_1>..."``)."""
        return "".join(self.token_strs[start:stop])


@dataclass
class ShowoTokenizer:
    """A HF fast tokenizer with Show-o's additions, the image-code id layout and UniCTokens concept tokens.

    Build with :meth:`from_pretrained` (phi-1.5, local) or :meth:`build_for_tests` (tiny BPE); both run the same
    ``_add_showo_tokens`` path."""

    hf: object
    """The wrapped ``transformers`` fast tokenizer (mutated: Show-o and concept tokens are added to it)."""
    codebook_size: int
    """Number of image codes (Show-o 512: 8192; tiny: 1024)."""
    concepts: dict[str, ConceptTokens] = field(default_factory=dict)
    """Concepts added so far, by name, in add order."""

    def __post_init__(self) -> None:
        if self.codebook_size <= 0:
            raise ValueError(f"codebook_size must be > 0, got {self.codebook_size}")
        self._add_showo_tokens()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str, codebook_size: int = 8192) -> ShowoTokenizer:
        """Load the phi-1.5 tokenizer from a local dir (or a cached hub id) with ``padding_side='left'``.

        ``path == "builtin:tiny"`` returns :meth:`build_for_tests` instead."""
        if path == BUILTIN_TINY:
            return cls.build_for_tests(codebook_size=codebook_size)
        from transformers import AutoTokenizer

        path = os.path.expanduser(str(path))
        try:
            hf = AutoTokenizer.from_pretrained(path, padding_side="left",
                                               local_files_only=not os.path.exists(path) and _offline())
        except Exception as e:  # noqa: BLE001 - re-raised with the path and what is expected
            raise FileNotFoundError(
                f"tokenizer not found at {path!r}: the phi-1.5 tokenizer (microsoft/phi-1_5: tokenizer.json or "
                f"vocab.json + merges.txt) must be available locally; set model.tokenizer_path to that directory "
                f"({type(e).__name__}: {e})") from e
        if not getattr(hf, "is_fast", True):
            raise ValueError(f"tokenizer at {path!r} is not a fast tokenizer")
        return cls(hf=hf, codebook_size=codebook_size)

    @classmethod
    def build_for_tests(cls, texts: list[str] | None = None, codebook_size: int = 1024,
                        vocab_size: int = 1000) -> ShowoTokenizer:
        """Byte-level BPE trained with ``tokenizers`` on ``texts`` (default: :data:`BUILTIN_CORPUS`).

        Deterministic (same texts -> same vocab and merges in every process). ``vocab_size`` is the BPE size
        (256 bytes + ``<|endoftext|>`` + merges) before Show-o's additions."""
        texts = tuple(texts) if texts is not None else (BUILTIN_CORPUS,)
        hf = _wrap_fast(_train_bpe_json(texts, vocab_size))
        return cls(hf=hf, codebook_size=codebook_size)

    def _add_showo_tokens(self) -> None:
        hf = self.hf
        base = len(hf)
        if PAD_TOKEN in hf.get_vocab():
            raise ValueError(f"base tokenizer already contains {PAD_TOKEN!r}; Show-o's ids would not line up")
        hf.add_special_tokens({"pad_token": PAD_TOKEN})
        hf.add_tokens(list(SPECIAL_TOKENS))
        ids = hf.convert_tokens_to_ids([PAD_TOKEN, *SPECIAL_TOKENS])
        if ids != list(range(base, base + 10)) or len(hf) != base + 10:
            raise ValueError(f"Show-o special tokens did not get contiguous ids after the base vocab ({base}): {ids}")
        (self.pad_id, self.soi_id, self.eoi_id, self.sov_id, self.eov_id, self.t2i_id, self.mmu_id, self.t2v_id,
         self.v2v_id, self.lvg_id) = ids
        eot = hf.convert_tokens_to_ids(ENDOFTEXT)
        if eot is None or eot == hf.unk_token_id and hf.unk_token != ENDOFTEXT:
            raise ValueError(f"base tokenizer has no {ENDOFTEXT!r} token")
        if hf.bos_token_id not in (None, eot) or hf.eos_token_id not in (None, eot):
            raise ValueError(f"expected bos = eos = {ENDOFTEXT!r}, got {hf.bos_token!r} / {hf.eos_token!r}")
        self.sot_id = self.eot_id = self.bos_id = self.eos_id = eot
        self.hf.padding_side = "left"

    # ---------------------------------------------------------------- id layout
    @property
    def text_vocab_size(self) -> int:
        """len(text tokenizer) incl. Show-o specials and concept tokens (== image_offset)."""
        return len(self.hf)

    @property
    def image_offset(self) -> int:
        """Input id of image code 0 (= len(text tokenizer incl. specials and concept tokens))."""
        return len(self.hf)

    @property
    def mask_id(self) -> int:
        """MaskGIT mask id (= image_offset + codebook_size; the last id)."""
        return self.image_offset + self.codebook_size

    @property
    def vocab_size(self) -> int:
        """Rows of embed_tokens / lm_head (= mask_id + 1)."""
        return self.mask_id + 1

    @property
    def image_rows(self) -> slice:
        """lm_head rows / logit columns of the image codes (excludes the mask id)."""
        return slice(self.image_offset, self.image_offset + self.codebook_size)

    def __len__(self) -> int:
        return len(self.hf)

    # ---------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (Show-o prepends/appends them itself)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids; ids at or above ``image_offset`` (image codes, mask) are dropped."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        off = self.image_offset
        return self.hf.decode([i for i in ids if i < off], skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------- concepts
    def add_concept(self, name: str, num_tokens: int) -> ConceptTokens:
        """Add ``<name>`` and K learnable tokens right after the current text vocab (moves image_offset up by K+1).

        First concept: ``<token_0..K-1>`` (UniCTokens); later concepts: ``<name_token_0..K-1>``."""
        if not name or any(c in name for c in "<> "):
            raise ValueError(f"concept name {name!r} must be non-empty without '<', '>' or spaces")
        if name in self.concepts:
            raise ValueError(f"concept {name!r} already added")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        prefix = "token" if not self.concepts else f"{name}_token"
        concept_str = f"<{name}>"
        token_strs = [f"<{prefix}_{i}>" for i in range(num_tokens)]
        vocab = self.hf.get_vocab()
        clash = [s for s in [concept_str, *token_strs] if s in vocab]
        if clash:
            raise ValueError(f"concept {name!r}: token(s) already in the vocabulary: {clash[:3]}")
        base = len(self.hf)
        self.hf.add_tokens([concept_str, *token_strs])
        ids = self.hf.convert_tokens_to_ids([concept_str, *token_strs])
        if ids != list(range(base, base + num_tokens + 1)):
            raise ValueError(f"concept {name!r} tokens did not get contiguous ids from {base}: {ids}")
        ct = ConceptTokens(name=name, concept_id=ids[0], token_ids=ids[1:], concept_str=concept_str,
                           token_strs=token_strs)
        self.concepts[name] = ct
        return ct


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


@functools.lru_cache(maxsize=8)
def _train_bpe_json(texts: tuple[str, ...], vocab_size: int) -> str:
    """Train a byte-level BPE once per process and return it serialised (the cached object is never mutated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(texts), trainer=trainer)
    return tk.to_str()


def _wrap_fast(tokenizer_json: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token=ENDOFTEXT,
                                   eos_token=ENDOFTEXT, unk_token=ENDOFTEXT, padding_side="left")
