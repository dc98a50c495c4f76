"""The text-encoding stage: its own actor pool, so render actors never hold the text encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from skyreels_batch.config import PipelineOptions
from skyreels_batch.control import ModelLoad, held_here, model_loaded, stopping
from skyreels_batch.models import ModelCard
from skyreels_batch.render.embeddings import EmbeddingStore, texts_for
from skyreels_batch.render.pipelines import encode_text, load_text_encoder
from skyreels_batch.schema import RenderParams
from skyreels_batch.stages import VALIDATED, TorchRowStage

if TYPE_CHECKING:
    from ray.actor import ActorHandle


class EncodePrompts(TorchRowStage):
    """Validated rows -> the same rows, once every text they are rendered with (each segment's prompt, the negative
    prompt) has its embeddings in `<output>/_embeddings/`. A text already there (another row's, or an earlier
    attempt's) is not encoded again. Once the job is stopping, rows pass on `stopped`, unencoded."""

    output_schema = VALIDATED
    failure = "text encoding failed"

    def __init__(
        self,
        card: ModelCard,
        *,
        output: str,
        device: str,
        torch_threads: int,
        options: PipelineOptions | None = None,
        control: ActorHandle | None = None,
    ) -> None:
        self.model_load = ModelLoad("text")
        self.pipeline = self.start_torch(
            lambda: load_text_encoder(card, device, options, self.model_load), torch_threads
        )
        model_loaded(control, self.model_load)
        self.control = control
        self.store = EmbeddingStore(output, card.name)
        self.encoded = 0  # texts this actor encoded

    def process(self, params: RenderParams, row: dict[str, Any]) -> dict[str, Any]:
        if stopping(self.control):
            return {"stopped": True}
        held_here(self.control, params.id)
        # Looked up every time (no memory of what is stored): the job control removes a file once no row in flight
        # needs it, and the next row with that text is admitted, and so encodes it again, after that.
        for text in texts_for(params):
            if not self.store.has(text):
                self.store.save(text, encode_text(self.pipeline, text))
                self.encoded += 1
        return {}
