"""An embedded default processor (tokenizer + image processor + LlavaProcessor), built locally with no download.

The tokenizer is a byte-level BPE trained on the fly on a fixed built-in corpus (so the result is identical on
every machine and every call), with Llama-style specials: ``<unk>`` 0, ``<s>`` 1 (prepended as bos), ``</s>`` 2
(eos), ``<pad>`` 3, ``<image>`` 4.  The image processor is a CLIP one at ``image_size`` px.  The LlavaProcessor's
image-token expansion matches a tiny CLIP vision tower with ``image_size``/``patch_size`` and
``vision_feature_select_strategy="default"`` (CLS dropped): N = (image_size // patch_size) ** 2 tokens.

For the model side: ``vocab_size = len(processor.tokenizer)``, ``image_token_id = processor.image_token_id``,
``pad_token_id = processor.tokenizer.pad_token_id``; the CLIP vision config needs ``image_size`` and
``patch_size`` equal to the arguments here.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# Fixed training text: the template's words plus everyday English used by instruction data.  Changing it
# changes every token id, so treat it as frozen.
_CORPUS = """A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: ASSISTANT:
What is in the image? Describe the image in detail. What color is the object? How many people are there?
What does the chart show? Read the text in the document. What is the title of the table? What is the total?
Which year has the highest value? What is the diagnosis? Is there any abnormality in the scan? The patient
has a lesion in the left lung. The image shows a red square, a blue circle and a green triangle on a white
background. There are two cats sitting on a sofa next to a window. The document is an invoice dated March.
The answer is yes. The answer is no. The value increases from 2010 to 2020. Summarize the paragraph.
Explain why the sky is blue. Write a short poem about the sea. Translate the sentence into French.
the of and to in is it you that he was for on are with as they be at one have this from or had by hot word
but what some we can out other were all there when up use your how said an each she which do their time if
will way about many then them write would like so these her long make thing see him two has look more day
could go come did number sound no most people my over know water than call first who may down side been now
find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause
much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father head stand
own page should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late run
while press close night real life few north open seem together next white children begin got walk example
ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face
wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family
direct pose leave song measure door product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly
fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty
drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong special
mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among 0 1 2 3 4 5 6 7 8 9 10 100 . , ; : ! ? ' " ( ) - / % $ &
"""


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Deterministic byte-level BPE wrapped as a transformers fast tokenizer (bos prepended, no eos)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable: no <unk> in practice
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    # Llama-style: bos in front, no eos (the conversation template writes "</s>" itself).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=4096,
    )


def build_tiny_processor(image_size: int = 32, patch_size: int = 8, vocab_size: int = 1024):
    """Build the embedded default LlavaProcessor (no download; same result on every call).

    image_size: CLIP input resolution (resize shortest edge + center crop); must be a multiple of patch_size.
    patch_size: the vision tower's patch size; the processor expands "<image>" into
        (image_size // patch_size) ** 2 image tokens (CLS added then dropped by the "default" strategy).
    vocab_size: BPE vocabulary size target (the built-in corpus may yield fewer; use len(tokenizer)).
    Save with ``processor.save_pretrained(dir)``; reload offline with :func:`load_processor`.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(vocab_size),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def load_processor(path: str):
    """Load a processor saved with save_pretrained (local directory, offline)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)
