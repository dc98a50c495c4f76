"""What a render worker holds: the loaded pipelines, the denoiser of one rank or a group of ranks, the one module
that reaches inside diffusers (diffusion_forcing.py), a video's persisted segments, prompt embeddings, inputs."""
