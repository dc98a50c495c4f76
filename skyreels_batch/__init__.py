"""skyreels-batch: distributed batch rendering of SkyReels-V2 videos on Ray Data."""

__version__ = "0.1.0"
