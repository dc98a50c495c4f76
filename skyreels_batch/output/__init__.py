"""What a run leaves and how people read it: the results index, the gallery, the run report, the dataset's metadata,
posters and contact sheets, MP4 encoding, and the quality signals."""
