"""Deployment helpers: what the manifests in infra/ and docs/deploy.md are generated or sized from.

- ``policy``: per-center S3 access (IAM policies), so no center can see another's slides.
- ``rayservice``: the RayService's ``serveConfigV2``, rendered from serve/config.yaml.
- ``sizing``: how many GPUs and CPUs a network needs, from the figures measured in bench/.
"""
