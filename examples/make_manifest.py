"""Write examples/manifest.parquet, the example manifest the README renders with the embedded model."""

from pathlib import Path

from skyreels_batch.job.manifest import write_manifest

ROWS = [
    {"id": "cat-baking", "prompt": "A cat and a dog baking a cake together in a sunny kitchen.", "seed": 42},
    {"id": "harbour-dawn", "prompt": "Fishing boats leaving a harbour at dawn, mist on the water.", "fps": 16},
    {
        "id": "city-rain",
        "prompt": "A neon-lit city street in the rain, reflections on the asphalt.",
        "num_frames": 33,
        "height": 96,
        "width": 160,
        "seed": 7,
    },
    {
        "id": "forest-walk",
        "prompt": "A slow walk through a pine forest, sunlight through the trees.",
        "negative_prompt": "blurry, low quality",
        "guidance_scale": 5.0,
        "shift": 5.0,
    },
    # A long video: 257 frames in 97-frame windows continuing from 17 frames, with prompt travel.
    {
        "id": "coast-drive",
        "prompt": "A car driving along a coastal road.",
        "num_frames": 257,
        "base_num_frames": 97,
        "overlap_history": 17,
        "seed": 3,
        "segment_prompts": [
            "A car driving along a coastal road at sunrise.",
            "The same road at noon, waves breaking below.",
            "The road at sunset, lights coming on in a village.",
        ],
    },
]

if __name__ == "__main__":
    print(write_manifest(Path(__file__).with_name("manifest.parquet"), ROWS))
