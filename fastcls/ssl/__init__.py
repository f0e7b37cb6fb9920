"Self-supervised pretraining: data and views, methods (SimCLR, MoCo v2, BYOL, SimSiam, DINO), learner and hand-over"
