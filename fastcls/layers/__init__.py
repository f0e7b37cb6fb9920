"Building blocks added to timm backbones: attention, pooling, classifier heads"
