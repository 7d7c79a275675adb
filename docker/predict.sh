#!/bin/sh
# FLARE-style entry point: the organisers run
#   docker container run --gpus "device=0" --rm -v $PWD/inputs/:/workspace/inputs/ \
#       -v $PWD/outputs/:/workspace/outputs/ teamname:latest /bin/bash -c "sh predict.sh"
# (flare.grand-challenge.org/Evaluation). Settings: the CIMIS_* variables of the Dockerfile.
set -e
python /opt/cimis/inference.py -i /workspace/inputs -o /workspace/outputs
