"fastai callbacks: MixUp/CutMix, long-tail training, WS-DAN, checkpoints"
